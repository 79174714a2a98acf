"""A small pool of flat communication buffers, reused instead of reallocated.

Buffers are raw bytes viewed as the dtype at hand, so one buffer serves float32 and bfloat16
messages alike. Capacities round up to a power of two so that messages of nearby sizes reuse
the same buffer; the free list is capped so a long run holds a bounded number of buffers.
On GPUs a stable set of buffers is also what makes NCCL user-buffer registration and CUDA
graph capture possible; on CPUs it removes allocator churn from the hot path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.comm.stats import CommStats


class BufferPool:
    def __init__(self, stats: CommStats, max_free: int = 8) -> None:
        self.stats = stats
        self.max_free = max_free
        self._free: list[Tensor] = []
        self.live = 0  # buffers handed out and not yet released

    def acquire(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat byte buffer on ``device`` (the message's own device) of at least ``numel``
        elements of ``dtype`` (view it yourself)."""
        need = numel * torch.empty((), dtype=dtype).element_size()
        fits = [i for i, b in enumerate(self._free) if b.numel() >= need and b.device == device]
        self.live += 1
        if fits:
            self.stats.buffer_reuses += 1
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        self.stats.buffer_allocs += 1
        return torch.empty(1 << max(need - 1, 1).bit_length(), dtype=torch.uint8, device=device)

    def release(self, buf: Tensor) -> None:
        self.live -= 1
        self._free.append(buf)
        if len(self._free) > self.max_free:  # drop the smallest: large ones are dearer to remake
            self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def discard(self, buf: Tensor) -> None:
        """A handed-out buffer that must not be reused (a failed transfer may still write)."""
        self.live -= 1

    def clear(self) -> None:
        self._free.clear()


def view_as(buf: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """The first ``numel`` elements of byte buffer ``buf`` seen as ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return buf[: numel * size].view(dtype)
