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

Devices: CPU tensors on gloo only (the segment is host memory); a CUDA tensor or an NCCL group
is refused with a ``CommError``.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from framework import HOST_ONLY, Algorithm, register_strategy
from framework.comm.shm import shm_segment_for


@register_strategy("shm")
class Shm(Algorithm):
    supports = HOST_ONLY

    def __init__(self, group=None, *, chunk_bytes: int = 1 << 20, **common: Any) -> None:
        self.require_positive(chunk_bytes=chunk_bytes)
        super().__init__(group, **common)
        self.segment = shm_segment_for(self.group, self.backend, chunk_bytes, self.timeout_s)
        self.stats.extra["shm"] = float(self.segment is not None)

    def wire_bytes(self, nbytes: int) -> int:
        if self.segment is None:
            return 2 * (self.world_size - 1) * nbytes // self.world_size
        return nbytes + nbytes // self.world_size  # my chunk in, my reduced slice

    def reduce_(self, x: Tensor) -> None:
        if self.segment is None:
            dist.all_reduce(x, group=self.group)
        else:
            self.segment.all_reduce_(x)

    def _release(self) -> None:
        super()._release()
        if self.segment is not None:
            self.segment.close()
