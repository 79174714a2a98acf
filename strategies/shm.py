"""shm: all-reduce through a shared-memory segment when every rank is on this host.

gloo's loopback TCP costs about a millisecond per small all-reduce on a CPU host; polling a
flag in shared memory costs about a microsecond. Each rank copies its input into the segment,
the ranks sum disjoint slices in parallel (reduce-scatter) and every rank copies the whole sum
back (all-gather); see :mod:`framework.comm.shm` for the protocol, waiting and clean-up. Messages
larger than ``chunk_bytes`` go in chunks, so the segment holds (p + 1) * chunk_bytes.

If the group spans several hosts (or the host cannot run the transport), every call falls back
to the library all-reduce, and ``stats.extra["shm"]`` is 0; ``hierarchical`` with
``intra=shm`` is the strategy for several hosts. Summation order is rank order per element
(slot 0 + slot 1 + ...), exact for integers; every rank receives the same bits.

``mode``: ``twoshot`` is the protocol above (copy in, reduce a slice each, copy the result
out: two barriers); ``oneshot`` copies in and lets every rank sum every slot itself in rank
order (one barrier, p times the reads: vLLM's CPU shared-memory all-reduce is one-shot);
``auto`` (the default) takes one-shot up to ``oneshot_max_bytes``, by default the crossover
measured on this host per world size (``ONESHOT_MAX_BYTES``, from ``experiment=shm_modes``:
none on this 2-core VM, where two-shot is never slower, so auto runs two-shot here).
Both sum in rank order: the modes give the same bits. Reduce-scatter and all-gather run
natively in the segment (the two halves of the two-shot all-reduce).

Fused ops: ``all_gather_matmul`` multiplies each rank's rows as soon as they land in the
segment, in ring order from this rank's own (which needs no wait), so the matmuls overlap the
slower peers' copies. With ``fuse_epilogue=true``, ``all_reduce_add_rmsnorm`` runs the epilogue
inside the two-shot reduction: each rank reduces its rows, adds its rows of the replicated
residual and norms them while they are in its cache, and every rank copies out both results
(TensorRT-LLM's reduce-scatter, add-norm, all-gather); each rank adds and norms 1/p of the
rows. Off by default: see results/fusion_overlap for what it measured here.

Implementation (``impl``): ``native`` runs every collective's copies, sums and waits in C with
the GIL released (``framework/comm/_shm_native.c``, built by pip when a compiler is there);
``python`` is the torch-ops path; ``auto`` (the default) takes native when it is built, else
Python with one warning. Both run the same protocol on the same segment and give the same bits;
the fused ops' epilogues and broadcast stay Python. ``stats.extra["shm_native"]`` and the log
say which ran.

Devices: CPU tensors on gloo only (the segment is host memory); a CUDA tensor or an NCCL group
is refused with a ``CommError``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from framework import HOST_ONLY, Algorithm, Handle, register_strategy
from framework.comm.fused import rms_norm
from framework.comm.library import ag_output
from framework.comm.shm import IMPLS, NATIVE_MISSING, shm_native, shm_segment_for

log = logging.getLogger(__name__)

MODES = ("oneshot", "twoshot", "auto")
# auto: one-shot up to these bytes per world size, two-shot above; measured on this host by
# `python -m experiments.bench -m experiment=shm_modes` (results/shm_modes/), native path. Up
# to 16 KiB the modes are equal within noise (0.74-1.24x either way, no size where one-shot
# wins at every world size; the view's crossover, 256 B at p = 4, is that one point); from
# 64 KiB two-shot is faster at 2, 3 and 4 ranks (one-shot reads p whole inputs per rank). So
# auto is two-shot here. A host where a barrier is dearer should be re-measured.
ONESHOT_MAX_BYTES = {2: 0, 3: 0, 4: 0}


@register_strategy("shm")
class Shm(Algorithm):
    chunked_ops = frozenset({"all_gather_matmul"})
    summation_order = "rank"  # both modes: input 0 + input 1 + ..., per element
    supports = HOST_ONLY

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_positive(chunk_bytes=options["chunk_bytes"])
        cls.require_one_of("mode", options["mode"], MODES)
        cls.require_at_least(0, oneshot_max_bytes=options["oneshot_max_bytes"])
        cls.require_one_of("impl", options["impl"], IMPLS)

    def __init__(
        self,
        group=None,
        *,
        chunk_bytes: int = 1 << 20,
        mode: str = "auto",
        oneshot_max_bytes: int | None = None,
        fuse_epilogue: bool = False,
        impl: str = "auto",
        **common: Any,
    ) -> None:
        super().__init__(group, **common)
        built = shm_native is not None
        self.impl = "native" if impl == "native" or (impl == "auto" and built) else "python"
        if impl == "native" and not built:
            raise self._error(NATIVE_MISSING)
        if impl == "auto" and self.impl == "python":
            warnings.warn(f"shm: {NATIVE_MISSING}; using the Python path", stacklevel=2)
        self.mode = mode
        self.fuse_epilogue = fuse_epilogue
        if oneshot_max_bytes is None:  # beyond the measured sizes: the largest measured p's
            oneshot_max_bytes = ONESHOT_MAX_BYTES.get(
                self.world_size, ONESHOT_MAX_BYTES[max(ONESHOT_MAX_BYTES)]
            )
        self.oneshot_max_bytes = oneshot_max_bytes
        self._wire: dict[tuple[str, int], int] = {}
        self.segment = shm_segment_for(
            self.group, self.backend, chunk_bytes, self.timeout_s, self.impl == "native"
        )
        self.stats.extra["shm"] = float(self.segment is not None)
        self.stats.extra["shm_native"] = float(self.segment is not None and self.impl == "native")
        log.info("shm: %s path", self.impl if self.segment is not None else "library (no segment)")
        self.stats.extra["shm_oneshot"] = 0.0  # all-reduces that took the one-shot path

    def oneshot(self, nbytes: int) -> bool:
        return self.mode == "oneshot" or (
            self.mode == "auto" and 0 < nbytes <= self.oneshot_max_bytes
        )

    def wire_bytes(self, nbytes: int) -> int:
        if self.segment is None:
            return 2 * (self.world_size - 1) * nbytes // self.world_size
        if self.oneshot(nbytes):
            return nbytes  # my input in; every rank reads the others
        return nbytes + nbytes // self.world_size  # my chunk in, my reduced slice

    def op_wire_bytes(self, op: str, nbytes: int) -> int:
        key = (op, nbytes)  # counted on every call: a microsecond saved on a ~5 us exchange
        wire = self._wire.get(key)
        if wire is None:
            if len(self._wire) > 256:
                self._wire.clear()
            if op == "all_reduce" or self.segment is None:
                wire = super().op_wire_bytes(op, nbytes)
            else:
                wire = nbytes  # reduce_scatter and all_gather: my input in
            self._wire[key] = wire
        return wire

    def reduce_(self, x: Tensor) -> None:
        if self.segment is None:
            self.library(dist.all_reduce, x)
        elif self.oneshot(x.nbytes):
            self.stats.extra["shm_oneshot"] += 1
            self.segment.all_reduce_oneshot_(x, self.deadline)
        else:
            self.segment.all_reduce_(x, self.deadline)

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        # a slot must hold at least one element of every rank's part
        if self.segment is None or self.segment.capacity < self.world_size * x.element_size():
            super().reduce_scatter_(x, out)
        else:
            self.segment.reduce_scatter_(x, out, deadline=self.deadline)

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        if self.segment is None:
            super().all_gather_(x, out)
        else:
            self.segment.all_gather_(x, out, deadline=self.deadline)

    # -- fused ops: the epilogue inside the reduction; each peer's rows multiplied on arrival.
    # Where the segment cannot (no segment, one-shot, too few rows, too large for one slot):
    # the base class's composition of the plain ops.
    def _all_reduce_add_rmsnorm(
        self, partial: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> Handle:
        seg = self.segment
        if (
            seg is None
            or not self.fuse_epilogue
            or self.oneshot(partial.nbytes)
            or not seg.add_norm_fits(partial)
        ):
            return super()._all_reduce_add_rmsnorm(partial, residual, weight, eps)
        new_residual, normed = torch.empty_like(residual), torch.empty_like(residual)

        def norm(rows: Tensor) -> Tensor:
            return self.compute(rms_norm, rows, weight, eps)

        self._start(partial)
        seg.all_reduce_add_norm_(partial, residual, norm, new_residual, normed, self.deadline)
        return Handle(self, None, (normed, new_residual))

    def _all_gather_matmul(self, shard: Tensor, weights: list[Tensor]) -> Handle:
        if self.segment is None or not self.segment.fits_one_slot(shard):
            return super()._all_gather_matmul(shard, weights)
        p, q = self.world_size, shard.shape[0]
        gathered = ag_output(shard, p)
        outs = [shard.new_empty(p * q, w.shape[1]) for w in weights]

        def multiply(j: int) -> None:
            rows = gathered[j * q : (j + 1) * q]
            for w, o in zip(weights, outs):
                torch.matmul(rows, w, out=o[j * q : (j + 1) * q])

        self._start(shard, "all_gather")
        self.segment.all_gather_each_(
            shard, gathered, lambda j: self.compute(multiply, j), self.deadline
        )
        return Handle(self, None, (gathered, outs))

    def _release(self) -> None:
        super()._release()
        if self.segment is not None:
            self.segment.close()
