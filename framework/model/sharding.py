"""Sharding layout: which slice of each full (HF-named) weight a TP rank holds.

Shared by ``TPLlama.init_random``, ``load_state_dict_full`` and the checkpoint loader, so the
three can never disagree on who holds what.
"""

from __future__ import annotations

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
    """(dim, start, stop) of rank ``tp_rank``'s slice of full weight ``name``; None if
    the weight is replicated on every rank.

    Heads are split in contiguous blocks, so q head j and kv head j // group stay on the
    same rank (HF's repeat_kv grouping) for any tp_size that divides num_kv_heads. When tp_size
    is a multiple of num_kv_heads, each KV head is replicated on tp_size / num_kv_heads
    consecutive ranks (rank r holds KV head r // replicas), as vLLM does: rank r's query heads
    all belong to that KV head's group.
    """
    cfg.validate_tp(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} out of range for tp_size={tp_size}")
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    if suffix not in _SHARDED:
        return None
    dim, kind = _SHARDED[suffix]
    full = {
        "heads": cfg.num_heads * cfg.hd,
        "kv_heads": cfg.num_kv_heads * cfg.hd,
        "intermediate": cfg.intermediate_size,
    }[kind]
    if kind == "kv_heads" and tp_size > cfg.num_kv_heads:  # replicated KV heads
        head = tp_rank // (tp_size // cfg.num_kv_heads)
        return dim, head * cfg.hd, (head + 1) * cfg.hd
    size = full // tp_size
    return dim, tp_rank * size, (tp_rank + 1) * size


def slice_dim(t: Tensor, shard: tuple[int, int, int] | None) -> Tensor:
    if shard is None:
        return t
    dim, start, stop = shard
    return t.narrow(dim, start, stop - start)
