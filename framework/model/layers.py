"""Layers of one TP rank: every collective of a decoder layer is on this screen.

The two row-parallel projections (attention's ``o_proj``, the MLP's ``down_proj``) produce
partial sums; each is reduced with ONE explicit ``comm.all_reduce(partial)`` inside the layer
that produces it, as vLLM's RowParallelLinear does. With sequence parallelism (a
:class:`SeqShard` passed in) the residual stream is split over tokens: the reduction becomes
``comm.reduce_scatter`` (each rank keeps its token shard of the sum), the norms run on the
shard, and an explicit ``comm.all_gather`` brings the normed tokens back before each
column-parallel projection: the same bytes on the wire, 1/p of the norm and residual work
(Megatron-LM's sequence parallelism; vLLM's rewrite of all-reduce + RMSNorm). The
communicator is duck-typed (:class:`AllReducer`), so this package never imports the
communication core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.model.config import ModelConfig
from framework.model.sharding import rank_layout


class AllReduceHandle(Protocol):
    def wait(self) -> Tensor: ...


class AllReducer(Protocol):
    """What the model needs from a communicator (framework.Communicator satisfies it);
    a Protocol so tests can pass tiny stand-ins. ``reduce_scatter`` and ``all_gather`` are
    only called with sequence parallelism on."""

    def all_reduce(self, x: Tensor) -> AllReduceHandle: ...

    def reduce_scatter(self, x: Tensor) -> AllReduceHandle: ...

    def all_gather(self, x: Tensor) -> AllReduceHandle: ...


@dataclass(frozen=True)
class SeqShard:
    """Sequence parallelism for one micro-batch: its ``batch x seq`` tokens, flattened and
    padded with zero rows to a multiple of the TP size, split into equal shards of rows (rank
    r holds rows ``[r rows, (r+1) rows)``). Zero rows stay zero through the norms and add
    nothing to any sum; they are dropped after every gather."""

    batch: int
    seq: int
    tp_size: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def padded(self) -> int:
        return math.ceil(self.tokens / self.tp_size) * self.tp_size

    @property
    def rows(self) -> int:
        return self.padded // self.tp_size

    def pad(self, x: Tensor) -> Tensor:
        """(batch, seq, D) -> (padded, D), contiguous."""
        flat = x.reshape(self.tokens, x.shape[-1])
        if self.padded == self.tokens:
            return flat.contiguous()
        return torch.cat([flat, flat.new_zeros(self.padded - self.tokens, flat.shape[1])])

    def unpad(self, x: Tensor) -> Tensor:
        """(padded, D) -> (batch, seq, D)."""
        return x[: self.tokens].view(self.batch, self.seq, x.shape[-1])

    def shard(self, x: Tensor, rank: int) -> Tensor:
        """This rank's rows of (batch, seq, D)."""
        return self.pad(x)[rank * self.rows : (rank + 1) * self.rows]


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


def kv_runs(cfg: ModelConfig, tp_rank: int, tp_size: int) -> tuple[tuple[int, int], ...] | None:
    """How this rank's query heads use its KV heads, as runs of (local KV head, query heads),
    or None when SDPA's ``enable_gqa`` grouping (local head j -> KV head j // (Hl / KVl))
    already is the mapping: always when the TP size divides the heads and divides or is a
    multiple of the KV heads (the layouts commlab always ran, kept bit for bit). Otherwise (9
    heads in groups of 3 at TP 2: rank 0 has 3 + 2 query heads on 2 KV heads) the runs differ
    in length and keys/values are expanded to one per query head."""
    layout = rank_layout(cfg, tp_rank, tp_size)
    (q0, q1), kv0 = layout.heads, layout.kv_heads[0]
    group = cfg.num_heads // cfg.num_kv_heads
    kv_of = [q // group - kv0 for q in range(q0, q1)]  # local KV head of each local query head
    runs = tuple((k, kv_of.count(k)) for k in range(layout.num_kv_heads))
    if len({n for _, n in runs}) == 1:  # equal runs in order: exactly the enable_gqa grouping
        return None
    return runs


class Attention(nn.Module):
    """This rank's share of grouped-query attention; returns the handle of the
    all-reduce of its partial o_proj output."""

    def __init__(
        self,
        cfg: ModelConfig,
        comm: AllReducer,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.comm = comm
        self.head_dim = cfg.hd
        layout = rank_layout(cfg, tp_rank, tp_size)
        self.n_heads = layout.num_heads  # local query heads
        self.n_kv_heads = layout.num_kv_heads  # local KV heads (some may be replicated)
        # Plain Python, not a buffer: survives the meta-device build and needs no device copy
        # (an index tensor would have to be refilled after to_empty and live on the device).
        self.kv_runs = kv_runs(cfg, tp_rank, tp_size)
        d, hd = cfg.hidden_size, cfg.hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: int | Tensor,
        sp: SeqShard | None = None,
    ) -> AllReduceHandle:
        """``pos``: the cache position of the first new token; an int (attend over the cache
        up to the new tokens) or a 1-element device tensor (one token, attend over the whole
        cache under ``mask``: fixed shapes for CUDA graphs). ``sp``: reduce-scatter the
        output over tokens instead of all-reducing it."""
        b, t, _ = x.shape  # x: (b, t, D), already normed
        hd = self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, hd).transpose(1, 2)  # (b, Hl, t, hd)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # (b, KVl, t, hd)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # (b, KVl, t, hd)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # (b, 1, t, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        # k/v caches are views of this micro-batch's rows of the layer cache.
        if isinstance(pos, Tensor):
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            keys, values = k_cache, v_cache  # (b, KVl, L, hd), L = the whole cache
        else:
            k_cache[:, :, pos : pos + t] = k
            v_cache[:, :, pos : pos + t] = v
            keys = k_cache[:, :, : pos + t]  # (b, KVl, L, hd)
            values = v_cache[:, :, : pos + t]  # (b, KVl, L, hd)
        if self.kv_runs is None:
            # enable_gqa: query head j uses kv head j // (Hl / KVl), as HF's repeat_kv, without
            # materialising repeated keys/values every decode step.
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=True
            )  # (b, Hl, t, hd)
        else:  # uneven groups (TP size not dividing the heads): one key/value per query head
            keys, values = self._per_query_head(keys), self._per_query_head(values)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (b, Hl, t, hd)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * hd)  # (b, t, Hl*hd)
        partial = self.o_proj(out)  # (b, t, D): this rank's heads' contribution only
        if sp is None:
            return self.comm.all_reduce(partial)
        return self.comm.reduce_scatter(sp.pad(partial))  # (rows, D): my tokens of the sum

    def _per_query_head(self, x: Tensor) -> Tensor:
        """(b, KVl, L, hd) -> (b, Hl, L, hd): KV head k repeated for its run of query heads."""
        assert self.kv_runs is not None
        b, _, n, hd = x.shape
        return torch.cat([x[:, k : k + 1].expand(b, r, n, hd) for k, r in self.kv_runs], dim=1)


class MLP(nn.Module):
    """This rank's slice of the SwiGLU MLP; returns the handle of the all-reduce of its
    partial down_proj output."""

    def __init__(
        self,
        cfg: ModelConfig,
        comm: AllReducer,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.comm = comm
        d, i = cfg.hidden_size, rank_layout(cfg, tp_rank, tp_size).intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, i, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(i, d, bias=False, dtype=dtype)

    def forward(self, x: Tensor, sp: SeqShard | None = None) -> AllReduceHandle:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (b, t, local I)
        partial = self.down_proj(h)  # (b, t, D): partial sum over this rank's channels
        if sp is None:
            return self.comm.all_reduce(partial)
        return self.comm.reduce_scatter(sp.pad(partial))  # (rows, D): my tokens of the sum


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        comm: AllReducer,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.comm = comm
        self.self_attn = Attention(cfg, comm, tp_rank, tp_size, dtype)
        self.mlp = MLP(cfg, comm, tp_rank, tp_size, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    # The layer is split in two halves (instead of one forward) so TPLlama can interleave
    # micro-batches between them while each half's all-reduce is in flight.
    def attention(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: int | Tensor,
        sp: SeqShard | None = None,
    ) -> AllReduceHandle:
        """``h``: the residual stream, (b, t, D), or with ``sp`` this rank's token shard."""
        x = self.input_layernorm(h)
        if sp is not None:  # the norm ran on my tokens; attention needs every token
            x = sp.unpad(self.comm.all_gather(x).wait())
        return self.self_attn(x, cos, sin, mask, k_cache, v_cache, pos, sp)

    def feed_forward(self, h: Tensor, sp: SeqShard | None = None) -> AllReduceHandle:
        x = self.post_attention_layernorm(h)
        if sp is not None:
            x = sp.unpad(self.comm.all_gather(x).wait())
        return self.mlp(x, sp)


class LlamaBody(nn.Module):
    """Exists only so parameter names carry HF's ``model.`` prefix."""

    def __init__(
        self,
        cfg: ModelConfig,
        comm: AllReducer,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, comm, tp_rank, tp_size, dtype) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


def split_batch(batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges; the first batch % k chunks get one extra row."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if micro_batches > batch:
        raise ValueError(
            f"micro_batches={micro_batches} exceeds batch size {batch}: every micro-batch "
            f"needs at least one sequence"
        )
    base, extra = divmod(batch, micro_batches)
    bounds, start = [], 0
    for i in range(micro_batches):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
