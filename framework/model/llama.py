"""Llama-family decoder with Megatron-style tensor parallelism and Domino-style
micro-batch interleaving.

Every rank holds:
  * a replicated embedding, final norm and lm_head (so no collective is needed at
    the ends of the network),
  * a contiguous block of about 1/tp_size of the query heads, the KV heads they use (q/k/v
    column-parallel, o_proj row-parallel) and of the MLP intermediate dimension (gate/up
    column-parallel, down_proj row-parallel). The TP size need not divide the head count:
    blocks are floor or ceil sized and a KV head shared across ranks is replicated
    (``framework.model.sharding.rank_layout``; vLLM and Megatron-LM refuse such sizes).

The two row-parallel projections produce partial sums; each is reduced with ONE
explicit call inside the layer that produces it, ``comm.all_reduce_add_rmsnorm(partial,
residual, norm.weight, eps)``: the sum, the residual add and the next norm as one op a
strategy may fuse. An exact forward therefore performs exactly ``2 * num_layers * units``
all-reduces (units: micro-batches, times the communicator's ``token_splits``) and nothing
else communicates. With sequence parallelism (``set_sequence_parallel``) a forward of enough
tokens instead performs, per unit, ``2 * num_layers`` ``matmul_reduce_scatter`` and as many
``all_gather_matmul`` calls plus one all-gather (the normed tokens to the head), and the
residual stream between them is this rank's shard of the tokens. The communicator is
duck-typed:

    handle = comm.all_reduce_add_rmsnorm(partial, residual, w, eps)  # partial given up
    normed, residual = handle.wait()

Parameter names mirror Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.
self_attn.q_proj.weight`` ...) so a full HF state dict maps onto this module by
name, and the rotary embedding uses HF's ``rotate_half`` convention so HF
checkpoints need no q/k permutation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.model.config import ModelConfig
from framework.model.layers import (
    AllReduceHandle,
    AllReducer,
    LlamaBody,
    SeqShard,
    rope_tables,
    split_batch,
)
from framework.model.sharding import full_param_shapes, param_shard, rank_layout, slice_dim

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
    ``load_state_dict_full`` or ``framework.model.checkpoint.load_hf_checkpoint`` first.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        comm: AllReducer,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
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
            self.model = LlamaBody(cfg, comm, tp_rank, tp_size, dtype)
            self.lm_head = (
                None
                if cfg.tie_word_embeddings
                else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
            )
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
        # sequence parallelism (set_sequence_parallel) and what it did
        self.sequence_parallel = False
        self.sp_min_tokens = 0
        self.sp_steps = 0  # forwards that ran sequence-parallel
        self.sp_padded_tokens = 0  # zero rows added to reach a multiple of the TP size

    def set_sequence_parallel(self, enabled: bool, min_tokens: int = 0) -> TPLlama:
        """Split the residual stream over tokens between the TP ranks in every forward of at
        least ``min_tokens`` tokens (batch x new tokens); below it (decode with a small
        batch) all-reduce as usual, the gate vLLM puts on its sequence-parallel pass."""
        if min_tokens < 0:
            raise ValueError(f"sp_min_tokens must be >= 0, got {min_tokens}")
        self.sequence_parallel, self.sp_min_tokens = enabled, min_tokens
        return self

    def set_communicator(self, comm: AllReducer) -> TPLlama:
        """Send every layer's collectives through ``comm`` from now on: the same shard and
        weights with another strategy (the runner's exact reference run)."""
        for module in self.modules():
            if "comm" in vars(module):
                module.comm = comm
        return self

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

        def fill(
            name: str,
            param: Tensor,
            shard: tuple[int, int, int] | None,
            lo: int,
            hi: int,
            block: int,
        ) -> None:
            full = shapes[name]
            r0, r1 = block * _INIT_BLOCK_ROWS, min((block + 1) * _INIT_BLOCK_ROWS, full[0])
            gen = torch.Generator().manual_seed(_stream_seed(seed, name, block))
            values = torch.empty((r1 - r0, *full[1:])).normal_(0.0, std, generator=gen)
            a, b = max(r0, lo), min(r1, hi)
            piece = values[a - r0 : b - r0]  # rows of this block that this rank keeps
            if shard is not None and shard[0] == 1:
                piece = piece[:, shard[1] : shard[2]]
            param[a - lo : b - lo].copy_(piece)  # disjoint rows per job: thread-safe

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
    def load_sharded(self, fetch: Callable[[str, tuple[int, int, int] | None], Tensor]) -> TPLlama:
        """Fill every parameter from ``fetch(hf_name, shard)``, which must return this
        rank's slice of the full weight (``shard`` as from ``param_shard``; None means the
        whole tensor). Shared by load_state_dict_full and the safetensors loader."""
        for name, param in self.named_parameters():
            shard = param_shard(name, self.cfg, self.tp_rank, self.tp_size)
            value = fetch(name, shard)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{name}: got shard of shape {tuple(value.shape)}, expected "
                    f"{tuple(param.shape)} (tp_rank={self.tp_rank}, tp_size={self.tp_size})"
                )
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
                raise ValueError(
                    f"{name}: shape {tuple(full.shape)} does not match the config's {shapes[name]}"
                )
            return slice_dim(full, shard)

        return self.load_sharded(fetch)

    # ---------------------------------------------------------------- cache

    @torch.no_grad()
    def reset_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """(Re)allocate an empty KV cache for ``batch_size`` sequences of up to ``max_len``
        positions (default cfg.max_seq_len). Shape per layer: (B, local kv heads, max_len,
        head_dim). Pass the smallest max_len you need: cache memory scales with it. A cache of
        the same shape is zeroed in place, not reallocated, so a captured CUDA graph that reads
        it stays valid across generations."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kv = rank_layout(self.cfg, self.tp_rank, self.tp_size).num_kv_heads
        shape = (batch_size, kv, max_len, self.cfg.hd)
        opts = {"dtype": self.dtype, "device": self.device}
        if self._k_cache and tuple(self._k_cache[0].shape) == shape:
            for t in (*self._k_cache, *self._v_cache, self._mask):
                t.zero_()
            self.cache_pos = 0
            return
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
    def forward(
        self,
        tokens: Tensor,
        attn_mask: Tensor | None = None,
        micro_batches: int = 1,
        last_only: bool = False,
    ) -> Tensor:
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
            raise ValueError(
                f"KV cache is not allocated for batch size {b}: call "
                f"reset_cache({b}, max_len) before the prefill"
            )
        pos, cache_len = self.cache_pos, mask_all.shape[1]
        if t < 1 or pos + t > cache_len:
            raise ValueError(
                f"cannot append {t} tokens at position {pos}: KV cache holds "
                f"{cache_len} positions (reset_cache max_len)"
            )
        tokens = tokens.to(self.device)
        if attn_mask is None:
            mask_all[:, pos : pos + t] = True
        elif tuple(attn_mask.shape) == (b, t):
            mask_all[:, pos : pos + t] = attn_mask.to(self.device, torch.bool)
        elif tuple(attn_mask.shape) == (b, pos + t):
            mask_all[:, : pos + t] = attn_mask.to(self.device, torch.bool)
        else:
            raise ValueError(
                f"attn_mask shape {tuple(attn_mask.shape)} must be ({b}, {t}) or ({b}, {pos + t})"
            )
        seen = mask_all[:, : pos + t]  # (B, L) key padding mask, L = pos + t
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
        sp = self.sequence_parallel and self.tp_size > 1 and b * t >= self.sp_min_tokens
        out = self._layers(tokens, cos, sin, mask, pos, micro_batches, last_only, sp)
        self.cache_pos = pos + t
        return out

    @torch.no_grad()
    def decode_static(self, tokens: Tensor, pos: Tensor, micro_batches: int = 1) -> Tensor:
        """One decode step whose shapes do not depend on the position, so a CUDA graph can
        capture it once and replay it for every token.

        ``tokens`` (B, 1) and ``pos`` (a 1-element long tensor: the cache position to write)
        live on the model's device and are read, not baked in, so a replay sees the values the
        caller copied into them. Attention runs over the whole cache with the positions after
        ``pos`` masked out: the same result as :meth:`forward` up to float rounding (checked
        by the tests). The caller advances ``cache_pos`` (host state a graph cannot update).
        Returns logits (B, 1, V).
        """
        mask_all = self._mask
        b = tokens.shape[0]
        if mask_all is None or mask_all.shape[0] != b:
            raise ValueError(f"KV cache is not allocated for batch size {b}")
        mask_all.index_fill_(1, pos, True)  # (B, L): the new token is real
        pos_ids = (mask_all.long().cumsum(-1) - 1).clamp(min=0).index_select(1, pos)  # (B, 1)
        cos, sin = self.rope_cos[pos_ids], self.rope_sin[pos_ids]  # (B, 1, hd)
        k_abs = torch.arange(mask_all.shape[1], device=self.device)  # (L,)
        causal = k_abs[None, :] <= pos[:, None]  # (1, L)
        diag = k_abs[None, :] == pos[:, None]  # (1, L)
        mask = ((causal & mask_all[:, None, :]) | diag)[:, None]  # (B, 1, 1, L) bool
        return self._layers(tokens, cos, sin, mask, pos, micro_batches, last_only=True)

    def _layers(
        self,
        tokens: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        pos: int | Tensor,
        micro_batches: int,
        last_only: bool,
        sequence_parallel: bool = False,
    ) -> Tensor:
        """Embedding, the decoder layers (with their collectives) and the head."""
        t = tokens.shape[1]
        units = self._units(tokens.shape[0], t, micro_batches, pos, sequence_parallel)
        x = self.model.embed_tokens(tokens)  # (B, t, D)
        if sequence_parallel:  # every rank embeds every token and keeps its shard: no comm
            self.sp_steps += 1
            self.sp_padded_tokens += sum(u.sp.padded - u.sp.tokens for u in units)
            resid = [u.sp.shard(x[u.rows, u.cols], self.tp_rank) for u in units]  # (rows, D)
        else:
            # the residual stream per unit, (b, t_u, D), contiguous (a run of tokens is not)
            resid = [x[u.rows, u.cols].contiguous() for u in units]
        layers = self.model.layers
        norms = [layer.input_layernorm for layer in layers] + [self.model.norm]
        normed = [norms[0](r) for r in resid]
        mlp_pending: list[AllReduceHandle | None] = [None] * len(units)

        # Domino-style schedule per layer, over units (micro-batches, or halves of their
        # tokens when the communicator asks for token splits):
        #   for each unit i: finish its previous MLP reduction, compute attention,
        #                    ISSUE the attention reduction;
        #   for each unit i: wait its attention reduction, compute MLP, ISSUE.
        # So unit i's reduction is in flight while unit i+1 computes, and an MLP handle is
        # only waited when that unit's hidden state is next needed. Token halves of one
        # sequence run in order: the second half's attention reads the first half's keys and
        # values, written to the cache a moment before.
        for li, layer in enumerate(layers):
            k_cache, v_cache = self._k_cache[li], self._v_cache[li]
            attn_pending: list[AllReduceHandle] = []
            for i, u in enumerate(units):
                handle = mlp_pending[i]
                if handle is not None:
                    normed[i], resid[i] = handle.wait()
                    mlp_pending[i] = None
                rows, cols = u.rows, u.cols
                keys = None if isinstance(pos, Tensor) else pos + cols.stop  # int pos: cut keys
                attn_pending.append(
                    layer.attention(
                        normed[i],
                        resid[i],
                        cos[rows, cols],
                        sin[rows, cols],
                        mask[rows, :, cols, :keys],
                        k_cache[rows],
                        v_cache[rows],
                        pos if isinstance(pos, Tensor) else pos + cols.start,
                        u.sp,
                    )
                )
            for i, u in enumerate(units):
                normed[i], resid[i] = attn_pending[i].wait()
                mlp_pending[i] = layer.feed_forward(normed[i], resid[i], norms[li + 1], u.sp)

        outs: dict[int, list[Tensor]] = {}  # micro-batch start -> its units' final hidden
        for i, u in enumerate(units):
            handle = mlp_pending[i]
            h = normed[i] if handle is None else handle.wait()[0]  # final-normed
            if u.sp is not None:  # gather every token's final hidden for the head
                h = u.sp.unpad(self.comm.all_gather(h).wait())
            if not last_only:
                outs.setdefault(u.rows.start, []).append(h)
            elif u.cols.stop == t:  # the unit holding each micro-batch's last token
                outs[u.rows.start] = [h[:, -1:]]  # (b_i, 1, D)
        hidden = [torch.cat(hs, dim=1) if len(hs) > 1 else hs[0] for hs in outs.values()]
        return torch.cat([self._lm_head(h) for h in hidden], dim=0)  # (B, t or 1, V)

    def _units(
        self, batch: int, t: int, micro_batches: int, pos: int | Tensor, sequence_parallel: bool
    ) -> list[Unit]:
        """The units the schedule interleaves: each micro-batch, cut into the communicator's
        ``token_splits(tokens)`` contiguous runs of tokens (TokenWeave: one half's reduction
        overlaps the other half's compute, which helps a batch of one where micro-batches
        cannot). Static decode (a tensor ``pos``) is never cut."""
        splits = getattr(self.comm, "token_splits", None)
        units = []
        for start, stop in split_batch(batch, micro_batches):
            n = 1
            if splits is not None and not isinstance(pos, Tensor):
                n = max(1, min(t, int(splits((stop - start) * t))))
            for c0, c1 in split_batch(t, n):
                sp = SeqShard(stop - start, c1 - c0, self.tp_size) if sequence_parallel else None
                units.append(Unit(slice(start, stop), slice(c0, c1), sp))
        return units


@dataclass(frozen=True)
class Unit:
    """A piece of one forward the layer schedule treats as a whole: batch ``rows`` and token
    ``cols`` of this step's tokens, with its sequence-parallel split (or None)."""

    rows: slice
    cols: slice
    sp: SeqShard | None
