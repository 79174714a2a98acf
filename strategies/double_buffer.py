"""double_buffer: a fixed ring of communication buffers, reused round-robin.

Each call copies its input into the next buffer, reduces it asynchronously through ``inner``
and copies the sum back out on ``wait()``; while buffer i is on the wire the caller fills
buffer i+1 (the "one computing while the other communicates" of the seed note). Buffers are
allocated once and only grow when a larger message arrives, never while in flight: a buffer
still in flight is first completed (its result copied out to its owner). ``buffer_allocs``
and ``buffer_reuses`` prove the reuse. The copies cost memory bandwidth on a CPU; the payoff
is on GPUs, where fixed buffers allow NCCL buffer registration and CUDA-graph capture.
Summation order is the inner algorithm's.

Devices: those of ``inner``; each buffer lives on the device of the message it carries.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from framework import Handle, Schedule, register_strategy
from framework.comm.buffers import view_as


@register_strategy("double_buffer")
class DoubleBuffer(Schedule):
    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_at_least(1, num_buffers=options["num_buffers"])

    def __init__(self, group=None, *, num_buffers: int = 2, **rest: Any) -> None:
        self.num_buffers = num_buffers
        super().__init__(group, **rest)
        self._bufs: list[Tensor | None] = [None] * num_buffers  # raw bytes, viewed per dtype
        self._in_flight: list[Handle | None] = [None] * num_buffers
        self._next = 0

    def _all_reduce(self, x: Tensor) -> Handle:
        i, self._next = self._next, (self._next + 1) % self.num_buffers
        if self._in_flight[i] is not None:  # complete the previous owner before reusing
            self._in_flight[i]._complete()  # raises if that collective failed
        nbytes = x.numel() * x.element_size()
        buf = self._bufs[i]
        if buf is None or buf.numel() < nbytes or buf.device != x.device:
            buf = self._bufs[i] = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
            self.stats.buffer_allocs += 1
        else:
            self.stats.buffer_reuses += 1
        view = view_as(buf, x.numel(), x.dtype)
        view.copy_(x.view(-1))
        fut = self.launch(view)
        h = Handle(self, lambda: self._finish(i, fut, view, x))
        self._in_flight[i] = h
        return h

    def _finish(self, i: int, fut: Future, view: Tensor, x: Tensor) -> Tensor:
        try:
            fut.result()
        except BaseException:
            if fut.done():  # failed: the slot is free (an interrupt leaves it in flight)
                self._in_flight[i] = None
            raise
        x.view(-1).copy_(view)  # on NCCL: ordered after the collective by result()
        self._in_flight[i] = None
        return x

    def _release(self) -> None:
        super()._release()
        self._bufs = [None] * self.num_buffers
