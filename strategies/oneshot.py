"""oneshot: every rank gathers every input and sums them itself, in rank order.

One latency step (the all-gather) instead of two-shot's two, at the price of every rank
receiving p - 1 whole inputs: the kind of all-reduce vLLM, SGLang and TensorRT-LLM take for
small messages (their custom one-shot kernels, and vLLM's CPU shared-memory all-reduce). The
gather is ``inner``'s (default ``naive``: the library's all-gather; ``inner=shm`` gathers
through shared memory). Summation order is rank order per element (input 0 + input 1 + ...;
16-bit floats in float32, rounded once: :mod:`framework.comm.reduction`), so every rank
computes the same bits without a broadcast.

Devices: those of ``inner``.
"""

from __future__ import annotations

from torch import Tensor

from framework import Composed, register_strategy, sum_rank_order


@register_strategy("oneshot")
class OneShot(Composed):
    summation_order = "rank"

    def wire_bytes(self, nbytes: int) -> int:
        return self.inner.op_wire_bytes("all_gather", nbytes)

    def reduce_(self, x: Tensor) -> None:
        p = self.world_size
        if p == 1:
            return
        flat = x.view(-1)
        gathered = flat.new_empty(p * flat.numel())
        self.inner_op("all_gather", flat, gathered)
        sum_rank_order(list(gathered.view(p, -1)), flat)
