"""Sharding layout: which heads, KV heads and MLP channels a TP rank holds, and so which slice
of each full (HF-named) weight it loads.

One function, :func:`rank_layout`, decides who holds what; ``param_shard`` (used by
``TPLlama.init_random``, ``load_state_dict_full`` and the checkpoint loader) and the layers'
local sizes both read it, so they can never disagree.

Any TP size up to the head count works. Query heads and intermediate channels are split into
contiguous blocks of floor(n/p) or ceil(n/p) (the first n % p ranks get one more): an even split
when p divides n. A rank holds exactly the KV heads its query heads use, so a KV head whose
query group spans ranks is replicated on each of them (Llama-3-70B's 8 KV heads at TP 16:
every KV head on 2 ranks, as vLLM does). vLLM and Megatron-LM refuse a TP size that does not
divide the head count (SmolLM2-135M's 9 heads at TP 2 or 4); commlab runs it, at the cost of
uneven work per rank. The collectives are unaffected: they carry hidden-size rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from framework.model.config import ModelConfig


def full_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> full (unsharded) shape, in module registration order."""
    d, hd, i = cfg.hidden_size, cfg.hd, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_heads * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_kv_heads * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_kv_heads * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.num_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (i, d)
        shapes[p + "mlp.up_proj.weight"] = (i, d)
        shapes[p + "mlp.down_proj.weight"] = (d, i)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def block(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of block ``index`` when n items are cut into ``parts`` contiguous blocks
    of floor or ceil(n / parts), the first n % parts blocks the larger."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class RankLayout:
    """What one TP rank holds, each as a [start, stop) range of global indices."""

    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # exactly the KV heads those query heads use
    intermediate: tuple[int, int]  # MLP channels

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]


def rank_layout(cfg: ModelConfig, tp_rank: int, tp_size: int) -> RankLayout:
    """Rank ``tp_rank``'s query heads, KV heads and MLP channels (see the module docstring)."""
    cfg.validate_tp(tp_size)
    if not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank!r} out of range for tp_size={tp_size}")
    q0, q1 = block(cfg.num_heads, tp_size, tp_rank)
    group = cfg.num_heads // cfg.num_kv_heads  # query head q uses KV head q // group (HF)
    return RankLayout(
        heads=(q0, q1),
        kv_heads=(q0 // group, (q1 - 1) // group + 1),
        intermediate=block(cfg.intermediate_size, tp_size, tp_rank),
    )


# (dim split across TP ranks, what that dim counts) per HF-named weight; absent = replicated.
_SHARDED = {
    "self_attn.q_proj.weight": (0, "heads"),  # column-parallel: output features split
    "self_attn.k_proj.weight": (0, "kv_heads"),
    "self_attn.v_proj.weight": (0, "kv_heads"),
    "self_attn.o_proj.weight": (1, "heads"),  # row-parallel: input features split
    "mlp.gate_proj.weight": (0, "intermediate"),
    "mlp.up_proj.weight": (0, "intermediate"),
    "mlp.down_proj.weight": (1, "intermediate"),
}


def param_shard(
    name: str, cfg: ModelConfig, tp_rank: int, tp_size: int
) -> tuple[int, int, int] | None:
    """(dim, start, stop) of rank ``tp_rank``'s slice of full weight ``name`` (its
    :func:`rank_layout` blocks, in rows or columns); None if the weight is replicated."""
    layout = rank_layout(cfg, tp_rank, tp_size)
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    if suffix not in _SHARDED:
        return None
    dim, kind = _SHARDED[suffix]
    start, stop = getattr(layout, kind)
    width = 1 if kind == "intermediate" else cfg.hd  # rows (or columns) per head
    return dim, start * width, stop * width


def slice_dim(t: Tensor, shard: tuple[int, int, int] | None) -> Tensor:
    if shard is None:
        return t
    dim, start, stop = shard
    return t.narrow(dim, start, stop - start)
