"""naive: one library all-reduce per call, blocking. The baseline every strategy is compared to.

The library picks its own algorithm (gloo: ring or halving-doubling; NCCL: ring or tree), so the
summation order is the library's. ``wire_bytes`` uses the ring figure 2(p-1)/p of the payload,
the bus-bandwidth convention of nccl-tests.

Devices: CPU and CUDA tensors on gloo (gloo stages CUDA tensors through host memory), CUDA
tensors on NCCL. Capturable in a CUDA graph on NCCL (``graph_safe``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from framework import Algorithm, register_strategy


@register_strategy("naive")
class Naive(Algorithm):
    graph_safe_backends = frozenset({"nccl"})

    def reduce_(self, x: Tensor) -> None:
        self.library(dist.all_reduce, x)

    def wire_bytes(self, nbytes: int) -> int:
        p = self.world_size
        return 2 * (p - 1) * nbytes // p
