"""Layers of one TP rank: every collective of a decoder layer is on this screen.

The two row-parallel projections (attention's ``o_proj``, the MLP's ``down_proj``) produce
partial sums; each is reduced with ONE explicit call inside the layer that produces it, as
vLLM's RowParallelLinear does, and the call is the fused op the reduction really is:
``comm.all_reduce_add_rmsnorm(partial, residual, norm.weight, norm.eps)`` sums the partials,
adds the residual stream and applies the next RMSNorm (TensorRT-LLM's and vLLM's fusion), so a
strategy may fuse those passes over memory. With sequence parallelism (a :class:`SeqShard`
passed in) the residual stream is split over tokens: the column-parallel projections start
with ``comm.all_gather_matmul(shard, weights)`` (gather every rank's normed tokens and
multiply) and the row-parallel ones end with ``comm.matmul_reduce_scatter(x, weight)`` (each
rank keeps its token rows of the sum), the pairs PyTorch's async-TP decomposes to overlap
transfer with compute; the add and norm then run on the shard (Megatron-LM's sequence
parallelism). The communicator is duck-typed (:class:`AllReducer`), so this package never
imports the communication core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.model.config import ModelConfig
from framework.model.sharding import rank_layout


class AllReduceHandle(Protocol):
    def wait(self) -> Any: ...


class AllReducer(Protocol):
    """What the model needs from a communicator (framework.Communicator satisfies it);
    a Protocol so tests can pass tiny stand-ins. ``all_gather_matmul``,
    ``matmul_reduce_scatter`` and ``all_gather`` are only called with sequence parallelism on.
    A communicator may also offer ``token_splits(tokens) -> int`` (see ``TPLlama``)."""

    def all_reduce_add_rmsnorm(
        self, partial: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> AllReduceHandle: ...

    def all_gather_matmul(self, shard: Tensor, weights: list[Tensor]) -> AllReduceHandle: ...

    def matmul_reduce_scatter(self, x: Tensor, weight: Tensor) -> AllReduceHandle: ...

    def all_gather(self, x: Tensor) -> AllReduceHandle: ...


class AddNorm:
    """The epilogue of a sequence-parallel block on this rank's tokens: wait for the
    reduce-scatter, add the residual shard, norm. ``wait()`` gives ``(normed, residual)``,
    like ``all_reduce_add_rmsnorm``'s handle."""

    def __init__(self, handle: AllReduceHandle, residual: Tensor, norm: RMSNorm) -> None:
        self.handle, self.residual, self.norm = handle, residual, norm

    def wait(self) -> tuple[Tensor, Tensor]:
        residual = self.residual + self.handle.wait()
        return self.norm(residual), residual


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
        residual: Tensor,
        norm: RMSNorm,
        sp: SeqShard | None = None,
    ) -> AllReduceHandle:
        """``x``: the normed input, (b, t, D), or with ``sp`` this rank's token rows of it.
        ``pos``: the cache position of the first new token; an int (attend over the cache up
        to the new tokens) or a 1-element device tensor (one token, attend over the whole
        cache under ``mask``: fixed shapes for CUDA graphs). Returns the handle of the
        reduction, whose ``wait()`` gives ``(norm(residual + sum), residual + sum)``."""
        if sp is None:
            b, t, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # gather every rank's tokens and multiply: the transfer a strategy may overlap
            b, t = sp.batch, sp.seq
            weights = [self.q_proj.weight.t(), self.k_proj.weight.t(), self.v_proj.weight.t()]
            _, qkv = self.comm.all_gather_matmul(x, weights).wait()
            q, k, v = (sp.unpad(y) for y in qkv)  # (b, t, *)
        hd = self.head_dim
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)  # (b, Hl, t, hd)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # (b, KVl, t, hd)
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # (b, KVl, t, hd)
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
        if sp is None:
            partial = self.o_proj(out)  # (b, t, D): this rank's heads' contribution only
            return self.comm.all_reduce_add_rmsnorm(partial, residual, norm.weight, norm.eps)
        rows = self.comm.matmul_reduce_scatter(sp.pad(out), self.o_proj.weight.t())
        return AddNorm(rows, residual, norm)  # (rows, D): my tokens of the sum

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

    def forward(
        self, x: Tensor, residual: Tensor, norm: RMSNorm, sp: SeqShard | None = None
    ) -> AllReduceHandle:
        """As :meth:`Attention.forward`: ``x`` normed, the handle gives ``(normed, residual)``
        with ``norm`` the next layer's input norm (or the final norm)."""
        if sp is None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (b, t, local I)
            partial = self.down_proj(h)  # (b, t, D): partial sum over this rank's channels
            return self.comm.all_reduce_add_rmsnorm(partial, residual, norm.weight, norm.eps)
        weights = [self.gate_proj.weight.t(), self.up_proj.weight.t()]
        _, (gate, up) = self.comm.all_gather_matmul(x, weights).wait()  # (padded, local I)
        h = F.silu(gate) * up  # zero pad rows stay zero
        rows = self.comm.matmul_reduce_scatter(h, self.down_proj.weight.t())
        return AddNorm(rows, residual, norm)  # (rows, D): my tokens of the sum


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
    # micro-batches between them while each half's reduction is in flight. Each half takes
    # its normed input and the residual stream and hands back (normed, residual) for the
    # next half: the norm belongs to the reduction before it (``input_layernorm`` is applied
    # by the previous layer's MLP reduction, or by TPLlama before the first layer).
    def attention(
        self,
        x: Tensor,
        residual: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        pos: int | Tensor,
        sp: SeqShard | None = None,
    ) -> AllReduceHandle:
        """``x``: ``input_layernorm(residual)``; (b, t, D), or with ``sp`` this rank's token
        rows. The handle gives ``(post_attention_layernorm(residual'), residual')``."""
        norm = self.post_attention_layernorm
        return self.self_attn(x, cos, sin, mask, k_cache, v_cache, pos, residual, norm, sp)

    def feed_forward(
        self, x: Tensor, residual: Tensor, next_norm: RMSNorm, sp: SeqShard | None = None
    ) -> AllReduceHandle:
        """The handle gives ``(next_norm(residual'), residual')``: ``next_norm`` is the next
        layer's ``input_layernorm``, or the final norm after the last layer."""
        return self.mlp(x, residual, next_norm, sp)


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
