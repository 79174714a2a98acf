"""Algorithms and schedules: the two kinds of strategy.

An :class:`Algorithm` (naive, tree, hierarchical) knows how to put ONE collective on the wire:
``reduce_`` (all-reduce, in place) and, by default from the library, ``reduce_scatter_`` and
``all_gather_`` (an algorithm overrides them where it has something better). Used on its own it
is blocking. A :class:`Schedule` (bucketed, async_overlap, double_buffer,
adaptive_threshold) decides *when* and *in what grouping* tensors are reduced and hands the
actual reductions to an inner algorithm through its own ``launch()``, so any schedule can be
crossed with any algorithm in a sweep (option ``inner``). The asynchrony belongs to the
schedule: an algorithm only knows how to run one collective (``run_op``, blocking).

``Schedule.launch()`` on gloo runs the inner algorithm on one progress thread per schedule. One FIFO
thread keeps the order of collectives identical on every rank (the contract of any collective),
works for algorithms built from blocking point-to-point calls as well as for library
collectives, and lets each collective be timed exactly where it runs, which the adaptive
strategy needs for its latency/bandwidth fit. Blocking library calls release the GIL, so the
caller's compute runs while the thread waits on the wire.

On NCCL nothing blocks the host, so ``launch()`` enqueues the inner algorithm on a CUDA
communication stream from the caller's thread and hands back an event to wait on
(:mod:`framework.comm.streams`): no thread, no host synchronisation in the hot path.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from framework.comm.communicator import Communicator
from framework.comm.handle import Handle
from framework.comm.library import (
    ag_output,
    library_all_gather,
    library_reduce_scatter,
    library_wire_bytes,
    rs_output,
)
from framework.comm.profiling import _enabled as _profiling
from framework.comm.profiling import span
from framework.comm.streams import StreamLauncher


class Algorithm(Communicator):
    """A blocking all-reduce algorithm; subclasses implement ``reduce_``."""

    def __init__(self, group=None, **common: Any) -> None:
        super().__init__(group, **common)
        self._reduce_span = f"commlab.{self.name}.reduce"
        # when the operation in progress must be done (time.monotonic()): the per-call
        # context every step of a composition shares, set by run_op or step
        self.deadline = 0.0

    @abstractmethod
    def reduce_(self, x: Tensor) -> None:
        """Sum ``x`` in place over ``self.group`` (the base class counts the collective)."""

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        """Write this rank's part of the sum of ``x`` into ``out`` (default: the library)."""
        self.library(library_reduce_scatter, out, x)

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        """Write every rank's ``x``, in rank order along dim 0, into ``out`` (the library)."""
        self.library(library_all_gather, out, x)

    def library(self, collective: Callable[..., Any], *args: Any, group: Any = None) -> None:
        """Run a library collective (``dist.all_reduce``, ...) on ``group`` (default: the
        private group) within what is left of this operation's ``timeout_s``: a step of a
        composition must not get a whole group timeout of its own (two steps could take
        twice ``timeout_s``), and a late peer is commlab's :class:`CommError`, not the
        library's error text. On NCCL the call is enqueued as it is (NCCL's watchdog)."""
        group = self.group if group is None else group
        if self._cuda:
            collective(*args, group=group)
        else:
            self.wait_work(collective(*args, group=group, async_op=True))

    def wire_bytes(self, nbytes: int) -> int:
        """Bytes this rank sends for one all-reduce of ``nbytes`` (algorithm-specific)."""
        return nbytes

    def op_wire_bytes(self, op: str, nbytes: int) -> int:
        """Bytes this rank sends for ``op`` on ``nbytes`` of input; reduce-scatter and
        all-gather default to the library's ring figures (override with the op methods)."""
        if op == "all_reduce":
            return self.wire_bytes(nbytes)
        return library_wire_bytes(op, nbytes, self.world_size)

    def output(self, op: str, x: Tensor) -> Tensor:
        """The tensor ``op`` leaves its result in: ``x`` itself for an all-reduce."""
        if op == "all_reduce":
            return x
        return (
            rs_output(x, self.world_size)
            if op == "reduce_scatter"
            else ag_output(x, self.world_size)
        )

    def run_op(self, op: str, x: Tensor, out: Tensor) -> None:
        """Put one ``op`` on the wire, blocking: counted, with ``timeout_s`` from now."""
        self._start(x, op)
        with span(self._reduce_span):
            self.step(op, x, out, self.deadline)

    def step(self, op: str, x: Tensor, out: Tensor, deadline: float | None = None) -> None:
        """Put ``op`` on the wire as one step of a caller's operation (a composition, a
        dispatcher): not counted (the caller counts its own), within ``deadline``
        (``time.monotonic()``; None: ``timeout_s`` from now). Sets :attr:`deadline`, then runs
        the op's hook (``reduce_``, ``reduce_scatter_``, ``all_gather_``): override those,
        not this, and pass ``self.deadline`` on to the steps they run."""
        self.deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        if op == "all_reduce":
            self.reduce_(x)
        elif op == "reduce_scatter":
            self.reduce_scatter_(x, out)
        else:
            self.all_gather_(x, out)

    def _all_reduce(self, x: Tensor) -> Handle:
        self._start(x)
        if _profiling():
            with span(self._reduce_span):
                self.reduce_(x)
        else:
            self.reduce_(x)
        return Handle(self, None, x)

    def _reduce_scatter(self, x: Tensor) -> Handle:
        out = self.output("reduce_scatter", x)
        self.run_op("reduce_scatter", x, out)
        return Handle(self, None, out)

    def _all_gather(self, x: Tensor) -> Handle:
        out = self.output("all_gather", x)
        self.run_op("all_gather", x, out)
        return Handle(self, None, out)

    def _start(self, x: Tensor, op: str = "all_reduce") -> None:
        """Before every collective: count it, and start its clock (:meth:`wait_work`)."""
        self.deadline = time.monotonic() + self.timeout_s
        self._count(x, op)

    def wait_work(self, work: Any) -> None:
        """Wait for an asynchronous library operation (``isend``/``irecv``, ``async_op=True``)
        with what is left of this all-reduce's ``timeout_s``: an algorithm made of several
        steps fails within ``timeout_s`` in all, not within ``timeout_s`` per step."""
        if self._cuda:  # a timed wait would block the host; NCCL's watchdog enforces timeout_s
            work.wait()
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            if work.is_completed():
                return
            raise self._late("")
        # whole milliseconds, at least one: torch reads a zero timeout as "the group's own"
        try:
            done = work.wait(timeout=timedelta(milliseconds=max(1, math.ceil(left * 1e3))))
        except RuntimeError as e:  # gloo raises when the wait times out (or a peer is lost)
            raise self._late(f": {e}") from e
        if not done:
            raise self._late("")

    def _late(self, detail: str) -> Exception:
        """The operation did not finish in time. Its transfers may still be running into the
        caller's tensor and scratch buffers, so the communicator is unusable from now on. The
        library does not say which peer it waits for: with two ranks it is the other one."""
        self._broken = self._owner._broken = True
        peers = [j for j in range(self.world_size) if j != self.rank]
        who = f"rank {peers[0]}" if len(peers) == 1 else f"one or more of ranks {peers}"
        return self._error(
            f"collective not complete within timeout_s={self.timeout_s} s: {who} lost or "
            f"late{detail}"
        )

    def _count(self, x: Tensor, op: str = "all_reduce") -> None:
        """One collective on the wire; called by the base class before every one."""
        self.stats.count_collective(op, self.op_wire_bytes(op, x.nbytes))

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


def check_algorithm(owner: str, key: str, name: Any, options: Any) -> None:
    """Refuse, in ``owner``'s words, an ``inner`` (or ``auto`` candidate) that is not a
    registered algorithm, and options that algorithm would refuse. Loads only that one
    plugin (and all of them only to list the choices in the error)."""
    from framework.comm.registry import get_strategy, inner_algorithms  # imports this module

    try:
        cls = get_strategy(name) if isinstance(name, str) else None
    except ValueError:
        cls = None
    if cls is None or not issubclass(cls, Algorithm) or name == owner:
        choices = [a for a in inner_algorithms() if a != owner]
        raise ValueError(
            f"strategy {owner!r}: {key}={name!r} is not an algorithm; choose one of {choices}"
        )
    if not isinstance(options, dict):
        raise ValueError(
            f"strategy {owner!r}: the options of {key}={name!r} must be a mapping, got {options!r}"
        )
    shared = sorted(set(options) & {"timeout_s", "validate"})
    if shared:
        raise ValueError(
            f"strategy {owner!r}: set {shared} on the strategy, not in the options of "
            f"{key}={name!r}; it passes them on"
        )
    try:
        cls.check_options(**options)
    except ValueError as e:
        raise ValueError(f"strategy {owner!r}, {key}={name!r}: {e}") from None


def _build_inner(owner: Communicator, inner: str, options: dict[str, Any]):
    """``owner``'s inner algorithm (:func:`~framework.comm.registry.build_inner`); the owner
    runs only where it does (``supports`` narrowed to the inner's)."""
    from framework.comm.registry import build_inner

    algo = build_inner(owner, inner, **options)
    owner.supports = {
        b: devices & algo.supports[b]
        for b, devices in type(owner).supports.items()
        if b in algo.supports
    }
    return algo


INNER = "inner"  # summation_order: the inner algorithm's


class _WithInner(Communicator):
    """A strategy that sends its collectives through an inner algorithm: ``inner`` names a
    registered algorithm, ``inner_options`` are passed to it (for example ``{"ranks_per_node":
    2}`` for ``hierarchical``). The options every communicator has (``timeout_s``,
    ``validate``) are set once, on the outer strategy, and passed on to the inner algorithm,
    so one timeout governs every group and segment the communicator owns."""

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        check_algorithm(cls.name, "inner", options["inner"], options["inner_options"] or {})

    def __init__(
        self,
        group=None,
        *,
        inner: str = "naive",
        inner_options: dict[str, Any] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(group, **common)
        self.inner = _build_inner(self, inner, dict(inner_options or {}))
        self.inner_name = inner
        # over a quantized wire the composition is not exact either; it states no bound of
        # its own (fusion moves the quantization blocks, a sum in the input dtype adds error)
        self.exact = self.inner.exact
        if self.summation_order == INNER:
            self.summation_order = self.inner.summation_order

    def end_warmup(self) -> None:
        self.inner.end_warmup()


class Composed(_WithInner, Algorithm):
    """An algorithm built on another algorithm's operations (``inner``, default ``naive``:
    the library's), as two-shot is a reduce-scatter and an all-gather. Counted as one
    collective of its own; the inner operations it calls are not counted again. Its own
    reduce-scatter and all-gather are the inner algorithm's."""

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        """The inner algorithm's (shm's native one, hierarchical's two levels, ...)."""
        self.inner_op("reduce_scatter", x, out)

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        self.inner_op("all_gather", x, out)

    def op_wire_bytes(self, op: str, nbytes: int) -> int:
        if op == "all_reduce":
            return self.wire_bytes(nbytes)
        return self.inner.op_wire_bytes(op, nbytes)

    def inner_op(self, op: str, x: Tensor, out: Tensor) -> None:
        """``op`` on the inner algorithm, on what is left of this collective's clock: every
        step of a composition shares one deadline, ``timeout_s`` from the collective's start."""
        self.inner.step(op, x, out, self.deadline)

    def _release(self) -> None:
        super()._release()
        self.inner._release()


class Schedule(_WithInner):
    """A strategy that schedules reductions and sends them through an inner algorithm
    (``inner``, ``inner_options``: see :class:`_WithInner`)."""

    summation_order = INNER  # it only decides when and in what groups inner sums

    def __init__(self, group=None, **options: Any) -> None:
        super().__init__(group, **options)
        # launch(): one FIFO progress thread on gloo (the order of collectives is the same on
        # every rank), a CUDA stream on NCCL; the schedule's, not the algorithm's
        self._progress: ThreadPoolExecutor | None = None
        self._streams: StreamLauncher | None = None
        self._thread_streams: dict[torch.device, Any] = {}  # gloo + CUDA: the thread's streams
        # (payload bytes, seconds) of recent all-reduces run through launch(): the adaptive
        # strategy fits its latency/bandwidth model on these.
        self.timings: deque[tuple[int, float]] = deque(maxlen=256)

    def launch(self, x: Tensor, op: str = "all_reduce", out: Tensor | None = None) -> Future:
        """Run ``op`` of ``inner`` on ``x`` asynchronously (into ``out``, from ``inner``'s
        :meth:`~Algorithm.output`, for the ops that do not work in place); ``future.result()``
        waits for it and returns the result (on NCCL: makes the caller's stream wait, see
        :mod:`framework.comm.streams`). Counted by ``inner`` as one collective."""
        out = x if out is None else out
        if self.backend == "nccl":
            if self._streams is None:
                self._streams = StreamLauncher()
            timings = self.timings if op == "all_reduce" else deque()  # the fit models all-reduce
            return self._streams.launch(x, lambda: self.inner.run_op(op, x, out), timings, out)  # type: ignore[return-value]
        if self._progress is None:
            self._progress = ThreadPoolExecutor(1, thread_name_prefix=f"commlab-{self.name}")
        ready = None
        if x.is_cuda:  # gloo with CUDA tensors: x is written on the caller's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(x.device))
        return self._progress.submit(self._timed, op, x, out, ready)

    def _timed(self, op: str, x: Tensor, out: Tensor, ready: Any = None) -> Tensor:
        t0 = time.perf_counter()
        if ready is None:
            self.inner.run_op(op, x, out)
        else:  # on a stream of this thread's own, after the caller's writes to x
            stream = self._thread_streams.get(x.device)
            if stream is None:
                stream = self._thread_streams[x.device] = torch.cuda.Stream(x.device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                self.inner.run_op(op, x, out)
            stream.synchronize()  # "done" on the host means done on the device
        if op == "all_reduce":  # the adaptive fit models all-reduces
            self.timings.append((x.numel() * x.element_size(), time.perf_counter() - t0))
        return out

    def _reduce_scatter(self, x: Tensor) -> Handle:
        """Launch through ``inner`` asynchronously; ``wait()`` waits (schedules override)."""
        return self._launch_op("reduce_scatter", x)

    def _all_gather(self, x: Tensor) -> Handle:
        return self._launch_op("all_gather", x)

    def _launch_op(self, op: str, x: Tensor) -> Handle:
        fut = self.launch(x, op, self.inner.output(op, x))
        return Handle(self, fut.result)

    def _release(self) -> None:
        if self._progress is not None:
            self._progress.shutdown(wait=True)
            self._progress = None
        self.inner._release()
