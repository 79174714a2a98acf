"""Llama-family decoder with Megatron-style tensor parallelism and Domino-style
micro-batch interleaving.

Every rank holds:
  * a replicated embedding, final norm and lm_head (so no collective is needed at
    the ends of the network),
  * a 1/tp_size slice of the attention heads (q/k/v column-parallel, o_proj
    row-parallel) and of the MLP intermediate dimension (gate/up column-parallel,
    down_proj row-parallel).

The two row-parallel projections produce partial sums; each is reduced with ONE
explicit ``comm.all_reduce(partial)`` inside the layer that produces it. An exact
forward therefore performs exactly ``2 * num_layers * micro_batches`` all-reduces
and nothing else communicates. The communicator is duck-typed:

    handle = comm.all_reduce(x)   # the caller gives x up
    y = handle.wait()             # summed tensor (may or may not be x itself)

Parameter names mirror Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.
self_attn.q_proj.weight`` ...) so a full HF state dict maps onto this module by
name, and the rotary embedding uses HF's ``rotate_half`` convention so HF
checkpoints need no q/k permutation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    """Shape of a Llama-family model (full, unsharded sizes).

    ``head_dim`` is resolved once, in ``__post_init__``, to ``hidden_size // num_heads``
    when given as None; ``dataclasses.replace`` keeps the resolved value, so pass
    ``head_dim=None`` explicitly if you change hidden_size/num_heads and want it re-derived.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}); set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            # RoPE rotates pairs of channels, so the head dimension must be even.
            raise ValueError(f"head_dim must be a positive even int, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")

    @property
    def hd(self) -> int:
        """Resolved head dimension (typed as int, unlike the ``head_dim`` field)."""
        if self.head_dim is None:  # unreachable after __post_init__; for type checkers
            raise ValueError("head_dim is unresolved")
        return self.head_dim

    def validate_tp(self, tp_size: int) -> None:
        """Raise ValueError unless every sharded dimension splits evenly over tp_size."""
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if value % tp_size != 0:
                raise ValueError(
                    f"tp_size={tp_size} does not divide {name}={value}: tensor parallelism "
                    f"shards {name} evenly across ranks")

    @property
    def num_params(self) -> int:
        """Total parameter count of the full (unsharded) model."""
        return sum(math.prod(s) for s in full_param_shapes(self).values())


PRESETS: dict[str, ModelConfig] = {
    # Tests: 24 heads / 12 kv heads / 384 intermediate split evenly over TP 2, 3 and 4.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=192, intermediate_size=384, num_layers=2,
        num_heads=24, num_kv_heads=12, head_dim=8, max_seq_len=128,
    ),
    # CPU benchmarks: ~100M parameters (embedding tied with lm_head).
    "small": ModelConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
        num_heads=12, num_kv_heads=4, head_dim=64, max_seq_len=1024,
        tie_word_embeddings=True,
    ),
    # Exact Llama-3 shapes; use dataclasses.replace(cfg, num_layers=2) for a cheap slice.
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_seq_len=8192,
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_seq_len=8192,
    ),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Return a copy of preset ``name`` with ``overrides`` applied (e.g. num_layers=2)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------
# Sharding layout, shared by init_random, load_state_dict_full and the checkpoint loader


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
    same rank (HF's repeat_kv grouping) for any tp_size that divides num_kv_heads.
    """
    cfg.validate_tp(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} out of range for tp_size={tp_size}")
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    if suffix not in _SHARDED:
        return None
    dim, kind = _SHARDED[suffix]
    full = {"heads": cfg.num_heads * cfg.hd, "kv_heads": cfg.num_kv_heads * cfg.hd,
            "intermediate": cfg.intermediate_size}[kind]
    size = full // tp_size
    return dim, tp_rank * size, (tp_rank + 1) * size


def _slice_dim(t: Tensor, shard: tuple[int, int, int] | None) -> Tensor:
    if shard is None:
        return t
    dim, start, stop = shard
    return t.narrow(dim, start, stop - start)


# ----------------------------------------------------------------------------------------
# Layers


class AllReduceHandle(Protocol):
    def wait(self) -> Tensor: ...


class AllReducer(Protocol):
    """What the model needs from a communicator (framework.Communicator satisfies it);
    a Protocol so tests can pass tiny stand-ins."""

    def all_reduce(self, x: Tensor) -> AllReduceHandle: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32 and the weight applied in the input dtype, exactly like
        # HF's LlamaRMSNorm, so low-precision runs round the same way as the reference.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """HF convention: channel c pairs with c + head_dim/2 (not interleaved pairs)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(cfg: ModelConfig, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_seq_len, head_dim) in float32, computed like HF's default RoPE."""
    hd = cfg.hd
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float)
    freqs = pos[:, None] * inv_freq[None, :]  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
    return emb.cos().to(device), emb.sin().to(device)


class Attention(nn.Module):
    """This rank's share of grouped-query attention; returns the handle of the
    all-reduce of its partial o_proj output."""

    def __init__(self, cfg: ModelConfig, comm: AllReducer, tp_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.comm = comm
        self.head_dim = cfg.hd
        self.n_heads = cfg.num_heads // tp_size  # local query heads
        self.n_kv_heads = cfg.num_kv_heads // tp_size  # local kv heads
        d, hd = cfg.hidden_size, cfg.hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False, dtype=dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                k_cache: Tensor, v_cache: Tensor, pos: int) -> AllReduceHandle:
        b, t, _ = x.shape  # x: (b, t, D), already normed
        hd = self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, hd).transpose(1, 2)  # (b, Hl, t, hd)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # (b, KVl, t, hd)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # (b, KVl, t, hd)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # (b, 1, t, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        # k/v caches are views of this micro-batch's rows of the layer cache.
        k_cache[:, :, pos:pos + t] = k
        v_cache[:, :, pos:pos + t] = v
        keys = k_cache[:, :, :pos + t]  # (b, KVl, L, hd)
        values = v_cache[:, :, :pos + t]  # (b, KVl, L, hd)
        # enable_gqa: query head j uses kv head j // (Hl / KVl), as HF's repeat_kv, without
        # materialising repeated keys/values every decode step.
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=True)  # (b, Hl, t, hd)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * hd)  # (b, t, Hl*hd)
        partial = self.o_proj(out)  # (b, t, D): this rank's heads' contribution only
        return self.comm.all_reduce(partial)


class MLP(nn.Module):
    """This rank's slice of the SwiGLU MLP; returns the handle of the all-reduce of its
    partial down_proj output."""

    def __init__(self, cfg: ModelConfig, comm: AllReducer, tp_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.comm = comm
        d, i = cfg.hidden_size, cfg.intermediate_size // tp_size
        self.gate_proj = nn.Linear(d, i, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, i, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(i, d, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> AllReduceHandle:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (b, t, I/tp)
        partial = self.down_proj(h)  # (b, t, D): partial sum over this rank's channels
        return self.comm.all_reduce(partial)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, comm: AllReducer, tp_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, comm, tp_size, dtype)
        self.mlp = MLP(cfg, comm, tp_size, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    # The layer is split in two halves (instead of one forward) so TPLlama can interleave
    # micro-batches between them while each half's all-reduce is in flight.
    def attention(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                  k_cache: Tensor, v_cache: Tensor, pos: int) -> AllReduceHandle:
        return self.self_attn(self.input_layernorm(h), cos, sin, mask, k_cache, v_cache, pos)

    def feed_forward(self, h: Tensor) -> AllReduceHandle:
        return self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Module):
    """Exists only so parameter names carry HF's ``model.`` prefix."""

    def __init__(self, cfg: ModelConfig, comm: AllReducer, tp_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, comm, tp_size, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


def split_batch(batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges; the first batch % k chunks get one extra row."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if micro_batches > batch:
        raise ValueError(
            f"micro_batches={micro_batches} exceeds batch size {batch}: every micro-batch "
            f"needs at least one sequence")
    base, extra = divmod(batch, micro_batches)
    bounds, start = [], 0
    for i in range(micro_batches):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# ----------------------------------------------------------------------------------------
# Model

_INIT_STD = 0.02
_INIT_BLOCK_ROWS = 1024  # rows generated per RNG stream in init_random


def _stream_seed(seed: int, name: str, block: int) -> int:
    # hashlib, not hash(): Python's str hash is salted per process, and every rank
    # (separate processes) must derive the same stream for the same weight block.
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TPLlama(nn.Module):
    """One tensor-parallel rank of a Llama decoder with an internal KV cache.

    Usage (prefill then decode)::

        model = TPLlama(cfg, comm, tp_rank, tp_size); model.init_random(seed=0)
        model.reset_cache(batch_size, max_len=prompt_len + new_tokens)
        logits = model(prompt_tokens, prompt_mask, micro_batches=k)   # (B, T, V)
        logits = model(next_tokens[:, None], micro_batches=k)         # (B, 1, V)

    Weights are uninitialised after __init__; call ``init_random``,
    ``load_state_dict_full`` or ``framework.checkpoint.load_hf_checkpoint`` first.
    """

    def __init__(self, cfg: ModelConfig, comm: AllReducer, tp_rank: int = 0,
                 tp_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        cfg.validate_tp(tp_size)
        if not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank!r} out of range for tp_size={tp_size}")
        self.cfg, self.comm = cfg, comm
        self.tp_rank, self.tp_size = tp_rank, tp_size
        # Build on the meta device and materialise without running nn.Linear's default
        # init: weights are always overwritten, and kaiming init of a 128k-vocab
        # embedding would cost seconds for nothing.
        with torch.device("meta"):
            self.model = _Body(cfg, comm, tp_size, dtype)
            self.lm_head = (None if cfg.tie_word_embeddings
                            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                           dtype=dtype))
        self.to_empty(device=device)
        self.requires_grad_(False)
        cos, sin = rope_tables(cfg, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (S, hd) float32
        self.register_buffer("rope_sin", sin, persistent=False)  # (S, hd) float32
        self._weights_ready = False
        self._k_cache: list[Tensor] = []
        self._v_cache: list[Tensor] = []
        self._mask: Tensor | None = None  # (B, cache_len) bool: real (True) vs pad
        self.cache_pos = 0  # number of positions already written to the cache

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ---------------------------------------------------------------- weights

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = _INIT_STD) -> TPLlama:
        """Deterministic N(0, std) weights (norm weights = 1) that are IDENTICAL as full
        tensors for every tp_size: each full weight is a stack of row blocks, each block
        drawn on CPU from its own generator seeded by (seed, name, block index); a rank
        draws only the blocks overlapping its rows and keeps its slice. Independent
        generators also let blocks be drawn in parallel threads (CPU RNG is serial, and a
        replicated 128k-vocab embedding is ~0.5G draws)."""
        shapes = full_param_shapes(self.cfg)

        def fill(name: str, param: Tensor, shard: tuple[int, int, int] | None,
                 lo: int, hi: int, block: int) -> None:
            full = shapes[name]
            r0, r1 = block * _INIT_BLOCK_ROWS, min((block + 1) * _INIT_BLOCK_ROWS, full[0])
            gen = torch.Generator().manual_seed(_stream_seed(seed, name, block))
            values = torch.empty((r1 - r0, *full[1:])).normal_(0.0, std, generator=gen)
            a, b = max(r0, lo), min(r1, hi)
            piece = values[a - r0:b - r0]  # rows of this block that this rank keeps
            if shard is not None and shard[0] == 1:
                piece = piece[:, shard[1]:shard[2]]
            param[a - lo:b - lo].copy_(piece)  # disjoint rows per job: thread-safe

        jobs = []
        for name, param in self.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
                continue
            shard = param_shard(name, self.cfg, self.tp_rank, self.tp_size)
            rows = shapes[name][0]
            lo, hi = (shard[1], shard[2]) if shard is not None and shard[0] == 0 else (0, rows)
            for block in range(lo // _INIT_BLOCK_ROWS, -(-hi // _INIT_BLOCK_ROWS)):
                jobs.append((name, param, shard, lo, hi, block))
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            for future in [pool.submit(fill, *job) for job in jobs]:
                future.result()
        self._weights_ready = True
        return self

    @torch.no_grad()
    def load_sharded(
        self, fetch: Callable[[str, tuple[int, int, int] | None], Tensor]
    ) -> TPLlama:
        """Fill every parameter from ``fetch(hf_name, shard)``, which must return this
        rank's slice of the full weight (``shard`` as from ``param_shard``; None means the
        whole tensor). Shared by load_state_dict_full and the safetensors loader."""
        for name, param in self.named_parameters():
            shard = param_shard(name, self.cfg, self.tp_rank, self.tp_size)
            value = fetch(name, shard)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{name}: got shard of shape {tuple(value.shape)}, expected "
                    f"{tuple(param.shape)} (tp_rank={self.tp_rank}, tp_size={self.tp_size})")
            param.copy_(value)
        self._weights_ready = True
        return self

    def load_state_dict_full(self, state_dict: Mapping[str, Tensor]) -> TPLlama:
        """Load full (unsharded) HF-named tensors, keeping this rank's slice. Extra keys
        (e.g. layers beyond cfg.num_layers, lm_head when tied) are ignored."""
        shapes = full_param_shapes(self.cfg)

        def fetch(name: str, shard: tuple[int, int, int] | None) -> Tensor:
            if name not in state_dict:
                raise ValueError(f"state dict has no tensor {name!r}")
            full = state_dict[name]
            if tuple(full.shape) != shapes[name]:
                raise ValueError(f"{name}: shape {tuple(full.shape)} does not match the "
                                 f"config's {shapes[name]}")
            return _slice_dim(full, shard)

        return self.load_sharded(fetch)

    # ---------------------------------------------------------------- cache

    @torch.no_grad()
    def reset_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """(Re)allocate an empty KV cache for ``batch_size`` sequences of up to ``max_len``
        positions (default cfg.max_seq_len). Shape per layer: (B, local kv heads, max_len,
        head_dim). Pass the smallest max_len you need: cache memory scales with it."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} must be in [1, max_seq_len="
                             f"{self.cfg.max_seq_len}]")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kv = self.cfg.num_kv_heads // self.tp_size
        shape = (batch_size, kv, max_len, self.cfg.hd)
        opts = {"dtype": self.dtype, "device": self.device}
        self._k_cache = [torch.zeros(shape, **opts) for _ in range(self.cfg.num_layers)]
        self._v_cache = [torch.zeros(shape, **opts) for _ in range(self.cfg.num_layers)]
        self._mask = torch.zeros((batch_size, max_len), dtype=torch.bool, device=self.device)
        self.cache_pos = 0

    # ---------------------------------------------------------------- forward

    def _lm_head(self, h: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    # no_grad, not inference_mode: tensors handed to comm.all_reduce may be updated in
    # place by a strategy later, outside this call or from a progress thread, where
    # inference mode (thread-local) would forbid in-place updates of inference tensors.
    @torch.no_grad()
    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None,
                micro_batches: int = 1, last_only: bool = False) -> Tensor:
        """Run ``tokens`` (B, T) through the model, appending them to the KV cache.

        Prefill: the first call after ``reset_cache`` (T >= 1). Decode: later calls,
        usually T == 1. ``attn_mask`` marks real (1) vs left-pad (0) tokens and may be
        (B, T) for the new tokens only or (B, cache_pos + T) for everything so far (HF
        style; earlier columns then overwrite what was recorded). None = all real.
        Position ids are ``cumsum(mask) - 1`` so left padding does not shift positions.

        micro_batches=k splits the batch into k contiguous chunks whose all-reduces are
        overlapped with the other chunks' compute (see the schedule below).

        Returns logits (B, T, V) in the model dtype, or (B, 1, V) for the last position
        only when ``last_only`` (skips the lm_head on prefill positions nobody reads).
        """
        if not self._weights_ready:
            raise RuntimeError("weights are uninitialised: call init_random() or load weights")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        mask_all = self._mask
        if mask_all is None or mask_all.shape[0] != b:
            raise ValueError(f"KV cache is not allocated for batch size {b}: call "
                             f"reset_cache({b}, max_len) before the prefill")
        pos, cache_len = self.cache_pos, mask_all.shape[1]
        if t < 1 or pos + t > cache_len:
            raise ValueError(f"cannot append {t} tokens at position {pos}: KV cache holds "
                             f"{cache_len} positions (reset_cache max_len)")
        bounds = split_batch(b, micro_batches)

        tokens = tokens.to(self.device)
        if attn_mask is None:
            mask_all[:, pos:pos + t] = True
        elif tuple(attn_mask.shape) == (b, t):
            mask_all[:, pos:pos + t] = attn_mask.to(self.device, torch.bool)
        elif tuple(attn_mask.shape) == (b, pos + t):
            mask_all[:, :pos + t] = attn_mask.to(self.device, torch.bool)
        else:
            raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} must be ({b}, {t}) "
                             f"or ({b}, {pos + t})")
        seen = mask_all[:, :pos + t]  # (B, L) key padding mask, L = pos + t
        pos_ids = (seen.long().cumsum(-1) - 1).clamp(min=0)[:, pos:]  # (B, t)
        cos, sin = self.rope_cos[pos_ids], self.rope_sin[pos_ids]  # (B, t, hd) float32
        q_abs = torch.arange(pos, pos + t, device=self.device)  # absolute query positions
        k_abs = torch.arange(pos + t, device=self.device)
        causal = k_abs[None, :] <= q_abs[:, None]  # (t, L)
        # Pad queries (left padding) would see no key at all -> softmax of all -inf = NaN.
        # Let every query see itself; pad rows then produce finite garbage nobody reads,
        # and real queries never see pad keys.
        diag = k_abs[None, :] == q_abs[:, None]  # (t, L)
        mask = ((causal & seen[:, None, :]) | diag)[:, None]  # (B, 1, t, L) bool

        x = self.model.embed_tokens(tokens)  # (B, t, D)
        mbs = [slice(s, e) for s, e in bounds]
        resid = [x[m] for m in mbs]  # residual stream per micro-batch, (b_i, t, D)
        mlp_pending: list[AllReduceHandle | None] = [None] * len(mbs)

        # Domino-style schedule per layer:
        #   for each micro-batch i: finish its previous MLP all-reduce, compute attention,
        #                           ISSUE the attention all-reduce;
        #   for each micro-batch i: wait its attention all-reduce, compute MLP, ISSUE.
        # So micro-batch i's all-reduce is in flight while micro-batch i+1 computes, and
        # an MLP handle is only waited when that micro-batch's hidden state is next needed.
        for li, layer in enumerate(self.model.layers):
            k_cache, v_cache = self._k_cache[li], self._v_cache[li]
            attn_pending: list[AllReduceHandle] = []
            for i, m in enumerate(mbs):
                handle = mlp_pending[i]
                if handle is not None:
                    resid[i] = resid[i] + handle.wait()
                    mlp_pending[i] = None
                attn_pending.append(layer.attention(
                    resid[i], cos[m], sin[m], mask[m], k_cache[m], v_cache[m], pos))
            for i in range(len(mbs)):
                resid[i] = resid[i] + attn_pending[i].wait()
                mlp_pending[i] = layer.feed_forward(resid[i])

        outs = []
        for i in range(len(mbs)):
            handle = mlp_pending[i]
            h = resid[i] if handle is None else resid[i] + handle.wait()
            if last_only:
                h = h[:, -1:]  # (b_i, 1, D)
            outs.append(self._lm_head(self.model.norm(h)))  # (b_i, t or 1, V)
        self.cache_pos = pos + t
        return torch.cat(outs, dim=0)  # (B, t or 1, V)
