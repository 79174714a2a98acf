"""Asynchronous collectives on a CUDA communication stream, without a host thread.

The pattern of DDP's communication hooks and vLLM's device communicators: the collective is
enqueued on a side stream that first waits for the compute stream (the input is produced
there), an event is recorded after it, and the consumer's stream waits on that event. The
host never blocks: enqueueing returns at once and ``result()`` only orders the streams, so the
caller's next kernels queue up behind the compute already in flight. With NCCL every algorithm
here (library collectives and ``isend``/``irecv`` trees alike) only enqueues work, so it runs
on the caller's thread; the progress thread stays for gloo, whose calls block the host.

Timings (for the adaptive strategy's fit) come from CUDA events read once they have completed,
never by waiting for them. A collective that fails on the device is reported by NCCL's
watchdog within the group's timeout, not by ``result()``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor


class StreamFuture:
    """The ``Future`` a schedule gets from ``Algorithm.launch`` on a CUDA stream."""

    __slots__ = ("_cuda", "_end", "_x")

    def __init__(self, cuda: Any, end: Any, x: Tensor) -> None:
        self._cuda, self._end, self._x = cuda, end, x

    def result(self) -> Tensor:
        """Make the caller's current stream wait for the collective; returns at once."""
        self._cuda.current_stream(self._x.device).wait_event(self._end)
        return self._x

    def done(self) -> bool:
        return bool(self._end.query())


class StreamLauncher:
    """One communication stream per communicator and device; ``cuda`` is ``torch.cuda``
    (a parameter so the protocol can be checked without a GPU)."""

    def __init__(self, cuda: Any = None) -> None:
        self.cuda = cuda if cuda is not None else torch.cuda
        self._streams: dict[Any, Any] = {}
        self._timing: deque[tuple[int, Any, Any]] = deque()

    def launch(
        self,
        x: Tensor,
        work: Callable[[], None],
        timings: deque[tuple[int, float]],
        out: Tensor | None = None,
    ) -> StreamFuture:
        """Enqueue ``work()`` (the collective on ``x``) on the communication stream; the
        future's result is ``out`` (default ``x``: in place)."""
        cuda = self.cuda
        stream = self._streams.get(x.device)
        if stream is None:
            stream = self._streams[x.device] = cuda.Stream(device=x.device)
        stream.wait_stream(cuda.current_stream(x.device))  # x is written on the compute stream
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        with cuda.stream(stream):
            start.record(stream)
            try:
                work()
            except Exception as e:  # fail through the future, as a thread's error would
                failed: Future = Future()
                failed.set_exception(e)
                return failed  # type: ignore[return-value]
            end.record(stream)
        self._harvest(timings)
        self._timing.append((x.nbytes, start, end))
        return StreamFuture(cuda, end, x if out is None else out)

    def _harvest(self, timings: deque[tuple[int, float]]) -> None:
        """Move the timings of completed collectives into ``timings`` (oldest first)."""
        while self._timing and self._timing[0][2].query():
            nbytes, start, end = self._timing.popleft()
            timings.append((nbytes, start.elapsed_time(end) * 1e-3))
