"""twoshot: a reduce-scatter, then an all-gather of the reduced parts.

Two latency steps, but each rank sends and receives only 2(p-1)/p of the message: the
bandwidth-optimal all-reduce, and what vLLM, SGLang and TensorRT-LLM switch to above their
one-shot limit. Built on ``inner``'s own reduce-scatter and all-gather (default ``naive``: the
library's; ``inner=shm`` or ``inner=hierarchical`` use theirs). A message whose element count
does not divide by p is padded with zeros to the next multiple in a scratch buffer. Summation
order is ``inner``'s reduce-scatter's; the all-gather hands every rank the same bits.

Devices: those of ``inner``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from framework import Composed, register_strategy
from framework.comm.algorithm import INNER
from framework.comm.buffers import BufferPool, view_as


@register_strategy("twoshot")
class TwoShot(Composed):
    summation_order = INNER  # its reduce-scatter is inner's

    def __init__(self, group=None, **options: Any) -> None:
        super().__init__(group, **options)
        self._pool = BufferPool(self.stats, max_free=2)

    def wire_bytes(self, nbytes: int) -> int:
        part = -(-nbytes // self.world_size)
        return self.inner.op_wire_bytes("reduce_scatter", nbytes) + self.inner.op_wire_bytes(
            "all_gather", part
        )

    def reduce_(self, x: Tensor) -> None:
        p = self.world_size
        if p == 1:
            return
        flat = x.view(-1)
        n = flat.numel()
        padded_n = -(-n // p) * p
        buf = None
        if padded_n == n:
            whole = flat
        else:  # pad with zeros: they add nothing to the sum and are dropped after the gather
            buf = self._pool.acquire(padded_n, x.dtype, x.device)
            whole = view_as(buf, padded_n, x.dtype)
            whole[:n].copy_(flat)
            whole[n:].zero_()
        part = whole.new_empty(padded_n // p)
        ok = False
        try:
            self.inner_op("reduce_scatter", whole, part)
            self.inner_op("all_gather", part, whole)
            ok = True
        finally:
            if buf is not None:
                if ok:
                    flat.copy_(whole[:n])
                    self._pool.release(buf)
                else:  # a timed-out transfer may still write into it
                    self._pool.discard(buf)

    def _release(self) -> None:
        super()._release()
        self._pool.clear()
