"""async_overlap: launch every call at once on the progress thread; ``wait()`` blocks.

Wins when the caller has independent work between issue and wait (the next micro-batch in the
TP runner): the reduction runs while that work computes. With nothing to overlap (one
micro-batch, wait right after issue) it costs a thread hand-off over ``naive``, and the
measurements show that. Summation order is the inner algorithm's.

Devices: those of ``inner``. On NCCL the launch is a CUDA communication stream and an event,
not the progress thread (:mod:`framework.comm.streams`).
"""

from __future__ import annotations

from torch import Tensor

from framework import Handle, Schedule, register_strategy


@register_strategy("async_overlap")
class AsyncOverlap(Schedule):
    def _all_reduce(self, x: Tensor) -> Handle:
        fut = self.launch(x)  # x is reduced in place; the caller gave it up until wait()
        return Handle(self, fut.result)
