"""A pending collective: what every op of a communicator returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from framework.comm.communicator import Communicator


class Handle:
    """A pending collective. ``wait()`` blocks until the result is ready and returns it: a
    tensor, or for a fused op the tuple its method names.

    ``finish`` is the strategy's completion step (wait for the wire, copy out of a buffer);
    it runs at most once. If it raises, the error is kept and raised again by every later
    ``wait()``: a failed collective never turns into a result. A handle created ready
    (blocking strategies) costs nothing to wait.
    """

    __slots__ = ("_comm", "_error", "_finish", "_input", "_op", "_result", "_span")

    def __init__(self, comm: Communicator, finish: Callable[[], Tensor] | None, result=None):
        self._comm = comm
        self._finish = finish
        self._result = result
        self._error: BaseException | None = None
        self._span: tuple[int, int] | None = None  # the input's bytes while in flight
        # the input itself while in flight: its memory must not be freed and reused by the
        # caller's next input while the span still counts as given up (reduce-scatter and
        # all-gather inputs are often temporaries nobody else holds)
        self._input: Tensor | None = None
        self._op = "all_reduce"  # set by the communicator that issued it
        if finish is not None:
            comm._pending[id(self)] = self

    @property
    def done(self) -> bool:
        return self._finish is None

    def wait(self) -> Any:
        if self._finish is None:
            if self._error is not None:
                raise self._error
            return self._result
        if self._comm._closed:
            raise self._comm._error(
                "wait() after close(): the communicator's groups and "
                "buffers are released; wait before closing"
            )
        comm = self._comm
        outer = comm._depth == 0
        t0, c0 = time.perf_counter(), comm.stats.compute_s
        try:
            with comm._blocked():
                self._complete()
        finally:  # the caller blocked on this op (a nested wait is its caller's time)
            if outer:
                comm.stats.by_op[self._op]["wait_s"] += comm._exposed_since(t0, c0)
        return self._result

    def _complete(self) -> None:
        finish, self._finish = self._finish, None
        if finish is None:  # completed earlier (successfully or not)
            if self._error is not None:
                raise self._error
            return
        comm = self._comm
        comm._pending.pop(id(self), None)
        if self._span is not None:
            comm._release_span(self._span)
        try:
            self._result = finish()
            self._input = None
        except Exception as e:
            self._error, self._input = e, None
            raise
        except BaseException:  # an interrupt stopped the wait, not the collective: retryable
            self._finish = finish
            comm._pending[id(self)] = self
            if self._span is not None:
                comm._hold_span(self._span)
            raise
