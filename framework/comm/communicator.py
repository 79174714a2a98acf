"""The one interface every collective strategy implements: all-reduce, reduce-scatter, all-gather.

A tensor-parallel layer calls ``comm.all_reduce(partial)`` (with sequence parallelism,
``comm.reduce_scatter(partial)`` and ``comm.all_gather(shard)``) and later ``handle.wait()``;
what happens in between (a blocking library call, fusion into a bucket, an asynchronous
launch, a tree of point-to-point messages) is the strategy's business. The base class owns
everything that must be identical across strategies so that measurements are comparable:

* input checks (contiguity, device, dtype, use after close) raised on the calling rank with the
  strategy's name, before anything touches the wire;
* the counters in :class:`CommStats`, including ``wait_s``, the time the caller spent blocked
  inside the communicator (the *exposed* communication time);
* pending-handle tracking, so ``flush()`` can complete everything;
* the optional ``validate`` fingerprint exchange that turns a desynchronised program into an
  error on every rank instead of a hang;
* a private duplicate of the process group, so a strategy's traffic (possibly issued from a
  progress thread) never interleaves with collectives the caller runs on its own group;
* the devices a strategy supports per backend (:attr:`Communicator.supports`): an unsupported
  backend is refused when the communicator is built, a tensor on an unsupported device when it
  is passed, both as a :class:`CommError` naming what is supported.
"""

from __future__ import annotations

import bisect
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.profiler import record_function

from framework.comm.fused import add_rmsnorm, check_fused, gather_matmul
from framework.comm.groups import acquire_group, release_group
from framework.comm.handle import Handle
from framework.comm.library import (
    LIBRARY_SUPPORT,
    ag_output,
    library_all_gather,
    library_reduce_scatter,
    library_wire_bytes,
    rs_output,
)
from framework.comm.options import type_hints, type_problem
from framework.comm.profiling import _enabled as _profiling
from framework.comm.stats import CommStats

# dtypes every built-in strategy can sum exactly as the library does (bool and complex are
# refused: SUM over bool is a logical OR in some backends and complex is not in gloo).
DEFAULT_DTYPES = frozenset(
    {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
    }
)

_OP_FLUSH, _OP_CLOSE = 2, 3
_OP_CODES = {
    "all_reduce": 1,
    "reduce_scatter": 4,
    "all_gather": 5,
    "all_reduce_add_rmsnorm": 6,
    "all_gather_matmul": 7,
    "matmul_reduce_scatter": 8,
}
_OP_NAMES = {_OP_FLUSH: "flush", _OP_CLOSE: "close"} | {v: k for k, v in _OP_CODES.items()}
_DTYPE_CODES = {dt: i for i, dt in enumerate(sorted(DEFAULT_DTYPES, key=str))}


class CommError(RuntimeError):
    """A communicator refused an input or found ranks out of step; the message names both."""


class Communicator(ABC):
    """Sums tensors over a process group; subclasses decide how and when.

    Options common to every strategy (keyword-only, like each strategy's own options):
    ``validate`` exchanges a (op, sequence, dtype, shape) fingerprint before each collective
    and raises on every rank when ranks disagree; ``timeout_s`` bounds every collective of the
    communicator's private group so a lost peer becomes an error, not a hang.
    """

    name: ClassVar[str] = "?"
    supported_dtypes: ClassVar[frozenset[torch.dtype]] = DEFAULT_DTYPES
    # backend -> device types this strategy's transport handles (see LIBRARY_SUPPORT)
    supports: ClassVar[dict[str, frozenset[str]]] = LIBRARY_SUPPORT
    # backends on which every collective of this strategy can be captured in a CUDA graph
    graph_safe_backends: ClassVar[frozenset[str]] = frozenset()
    # False for a strategy whose results may differ from the exact sum by more than float
    # rounding (a quantized wire): :meth:`error_bound` states by how much, the kit checks it
    exact: ClassVar[bool] = True
    # The per-element summation order when it depends neither on the message size nor on
    # what else is in the message (a token's bits are the same whatever the batch): "rank"
    # (input 0 + input 1 + ...), "tree", ...; None where it does (the library's ring cuts the
    # message by size) or is not known. INNER: the inner algorithm's (set per instance).
    # auto's deterministic=true keeps the candidates that share one such order.
    summation_order: ClassVar[str | None] = None
    # The fused ops whose matmul this strategy splits into row blocks (``overlap``'s chunks,
    # ``shm`` multiplying each peer's rows as they land): a blocked matmul may round
    # differently from one whole matmul, so the kit holds these to a stated tolerance
    # instead of the composed op's exact bits.
    chunked_ops: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        validate: bool = False,
        timeout_s: float = 60.0,
        _parent: Communicator | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise CommError(f"strategy {self.name!r}: torch.distributed is not initialised")
        self.validate = validate
        self.timeout_s = timeout_s
        self._closed = False
        self._broken = False  # a collective failed half-way: refuse new work, skip the flush
        # the communicator the user holds (the top of a chain of inner algorithms)
        self._owner = _parent._owner if _parent is not None else self
        self._seq = 0
        self._pending: dict[int, Handle] = {}
        self._leases: list[tuple[dist.ProcessGroup, int]] = []  # groups to hand back on close
        self._spans: list[tuple[int, int]] = []  # inputs in flight: (first byte, end), sorted
        self._depth = 0
        self._blocked_span = f"commlab.{self.name}.blocked"
        user_group = group if group is not None else dist.group.WORLD
        self.backend = dist.get_backend(user_group)
        if self.backend not in self.supports:
            raise CommError(
                f"strategy {self.name!r} does not run on the {self.backend} backend; it "
                f"supports {_describe_support(self.supports)}"
            )
        self.device = _device_for(self.backend)  # the group's own device (fingerprints)
        self._cuda = self.device.type == "cuda"
        self.ranks = dist.get_process_group_ranks(user_group)
        if _parent is not None:
            # An inner algorithm shares its scheduler's private group and counters, so the
            # scheduler's stats show what went on the wire without double-counting calls.
            self.group, self.stats = _parent.group, _parent.stats
        else:
            self.group, self.stats = self._new_group(), CommStats()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._check_group = self._new_group() if validate and _parent is None else None

    # -- public API -------------------------------------------------------------------------
    def all_reduce(self, x: Tensor) -> Handle:
        """Start summing ``x`` over the group; the caller gives ``x`` up until ``wait()``."""
        return self._call("all_reduce", x)

    def reduce_scatter(self, x: Tensor) -> Handle:
        """Start summing ``x`` over the group; ``wait()`` returns this rank's part of the sum:
        rows ``[r n/p, (r+1) n/p)`` of dim 0 (n rows, p ranks, rank r), a new tensor.

        Dim 0 must divide by p (a ``CommError`` otherwise): the caller pads, as the
        sequence-parallel model pads its tokens and counts the padding."""
        return self._call("reduce_scatter", x)

    def all_gather(self, x: Tensor) -> Handle:
        """Start gathering ``x`` from every rank; ``wait()`` returns them concatenated along
        dim 0 in rank order, a new tensor. Every rank passes the same shape."""
        return self._call("all_gather", x)

    # -- the fused ops: a collective with the compute beside it (framework.comm.fused) ------
    def all_reduce_add_rmsnorm(
        self, partial: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> Handle:
        """Start summing ``partial`` over the group; ``wait()`` returns ``(normed,
        new_residual)``: ``new_residual = residual + sum`` and ``normed`` its RMSNorm with
        ``weight`` and ``eps`` (:func:`~framework.comm.fused.rms_norm`), new tensors. The end
        of a TP layer's row-parallel block: ``residual`` and ``weight`` are the same on every
        rank (the replicated residual stream), which a strategy may rely on (``shm`` adds a
        slice of it per rank); ``residual`` is read until ``wait()``."""
        return self._call("all_reduce_add_rmsnorm", partial, residual, weight, eps)

    def all_gather_matmul(self, shard: Tensor, weights: list[Tensor]) -> Handle:
        """Start gathering the 2-D ``shard`` from every rank; ``wait()`` returns ``(gathered,
        [gathered @ w for w in weights])``: the start of a column-parallel block under
        sequence parallelism. The weights are read until ``wait()``."""
        return self._call("all_gather_matmul", shard, weights)

    def matmul_reduce_scatter(self, x: Tensor, weight: Tensor) -> Handle:
        """Start ``x @ weight`` summed over the group; ``wait()`` returns this rank's rows of
        the sum (rows ``[r n/p, (r+1) n/p)``, as :meth:`reduce_scatter`): the end of a
        row-parallel block under sequence parallelism. Dim 0 of ``x`` must divide by p."""
        return self._call("matmul_reduce_scatter", x, weight)

    def compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a fused op's own compute (a matmul, the add and norm): counted in
        ``stats.compute_s``, not in ``wait_s``, so exposed communication stays communication
        whichever strategy does the compute."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.compute_s += time.perf_counter() - t0

    def _call(self, op: str, x: Tensor, *args: Any) -> Handle:
        self._check_input(x, op)
        if args:
            problem = check_fused(op, x, args, self.world_size)
            if problem is not None:
                raise self._error(problem)
        # the hot path of every strategy: timed inline (no context manager), about 1 us
        outer = self._depth == 0
        self._depth += 1
        t0, c0 = time.perf_counter(), self.stats.compute_s
        try:
            if outer and _profiling():
                with record_function(self._blocked_span):
                    return self._issue(op, x, args)
            return self._issue(op, x, args)
        finally:
            self._depth -= 1
            if outer:
                dt = self._exposed_since(t0, c0)
                self.stats.wait_s += dt
                self.stats.by_op[op]["wait_s"] += dt

    def _issue(self, op: str, x: Tensor, args: tuple = ()) -> Handle:
        lo, nbytes = x.data_ptr(), x.nbytes
        hi = lo + nbytes
        spans = self._spans
        # The caller gave a pending input up until its wait(): a new input sharing its bytes
        # would be summed (or overwritten) twice, differently per strategy. Pending spans are
        # disjoint and sorted, so only the last one starting below ``hi`` can overlap.
        if spans and hi > lo:
            i = bisect.bisect_left(spans, (hi,))
            if i > 0 and spans[i - 1][1] > lo:
                raise self._error(
                    "input overlaps the memory of a collective still in flight (the caller "
                    "gives x up until wait()); wait for it first or pass a copy"
                )
        if self._check_group is not None:
            self._fingerprint(_OP_CODES[op], x)
        self.stats.count_call(op, nbytes)
        if op == "all_reduce":
            h = self._all_reduce(x)
        elif op == "reduce_scatter":
            h = self._reduce_scatter(x)
        elif op == "all_gather":
            h = self._all_gather(x)
        elif op == "all_reduce_add_rmsnorm":
            h = self._all_reduce_add_rmsnorm(x, *args)
        elif op == "all_gather_matmul":
            h = self._all_gather_matmul(x, *args)
        else:
            h = self._matmul_reduce_scatter(x, *args)
        h._op = op
        if not h.done and hi > lo:
            h._span, h._input = (lo, hi), x
            self._hold_span(h._span)
        return h

    def _hold_span(self, span: tuple[int, int]) -> None:
        bisect.insort(self._spans, span)

    def _release_span(self, span: tuple[int, int]) -> None:
        i = bisect.bisect_left(self._spans, span)
        if i < len(self._spans) and self._spans[i] == span:
            del self._spans[i]

    def flush(self) -> None:
        """Complete every pending handle (in issue order)."""
        self._check_open()
        with self._blocked():
            if self._check_group is not None:
                self._fingerprint(_OP_FLUSH, None)
            self._flush()
            for h in list(self._pending.values()):
                h._complete()

    def close(self) -> None:
        """Complete pending work, then release buffers, threads and groups. Idempotent."""
        if self._closed:
            return
        try:
            if not self._broken:
                if self._check_group is not None:
                    self._fingerprint(_OP_CLOSE, None)
                self._flush()
                for h in list(self._pending.values()):
                    h._complete()
        finally:
            self._closed = True
            self._release()
            for g, generation in self._leases:
                release_group(self.ranks, self.backend, self.timeout_s, g, generation)
            self._leases.clear()

    def reset_stats(self) -> None:
        self.stats.reset()

    def end_warmup(self) -> None:
        """Called by the runner after its warm-up: a strategy that tunes itself on the
        messages it sees (``auto``) fixes its choices here, before anything is measured."""

    def token_splits(self, tokens: int) -> int:
        """Into how many runs of tokens the model should cut a micro-batch of ``tokens``
        tokens inside each layer, so one run's reduction overlaps the next run's compute
        (``token_split``). 1: none."""
        return 1

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can capture this communicator's collectives: each is enqueued
        on the capturing stream with no host synchronisation, thread or host-side transport
        (``validate=True`` is not: its fingerprint check reads the gathered rows on the host)."""
        return self.backend in self.graph_safe_backends and self._check_group is None

    @property
    def pending(self) -> int:
        """Handles issued and not yet completed (bounded in a healthy loop)."""
        return len(self._pending)

    # -- options: declared once (the signature), checked in one place -----------------------
    def __new__(cls, group: Any = None, **options: Any) -> Communicator:
        """Building a strategy checks its options first (:meth:`check_options`): a bad value
        is refused before any rank touches the wire, in the same words as before a run."""
        cls.check_options(**{k: v for k, v in options.items() if not k.startswith("_")})
        return super().__new__(cls)

    @classmethod
    def declared_options(cls) -> dict[str, inspect.Parameter]:
        """Keyword-only options of every ``__init__`` in the class's MRO, base options
        included, less ``fixed_options`` (set by a subclass, not by users) and private ones."""
        out: dict[str, inspect.Parameter] = {}
        for klass in reversed(cls.__mro__):
            if "__init__" not in vars(klass) or not issubclass(klass, Communicator):
                continue
            hints = type_hints(klass.__init__)
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY and not p.name.startswith("_"):
                    out[p.name] = p.replace(annotation=hints.get(p.name, p.annotation))
        for name in getattr(cls, "fixed_options", ()):
            out.pop(name, None)
        return out

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Refuse unknown options, values of the wrong type, and values that break a rule of
        the strategy (each class's :meth:`option_rules`, base classes first), with a
        ``ValueError`` naming the strategy, the option, the value and what is allowed. The
        constructor runs it, and so does a run's validation before any rank starts: one
        path, so both refuse the same values in the same words."""
        declared = cls.declared_options()
        unknown = sorted(set(options) - set(declared))
        if unknown:
            raise ValueError(
                f"strategy {cls.name!r} has no option(s) {unknown}; its options are "
                f"{sorted(declared)}"
            )
        for key, value in options.items():
            what = type_problem(declared[key], value)
            if what is not None:
                raise ValueError(f"strategy {cls.name!r}: {key} must be {what}, got {value!r}")
        full = {k: p.default for k, p in declared.items()} | options
        for klass in reversed(cls.__mro__):
            rules = vars(klass).get("option_rules")
            if rules is not None:
                rules.__func__(cls, full)

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        """The rules of this class's own options (override; every class in the MRO that
        defines it runs its own, base classes first), given every option with its default
        filled in. Raise ``ValueError`` through the ``require_*`` helpers below."""
        cls.require_positive(timeout_s=options["timeout_s"])

    # -- for subclasses ---------------------------------------------------------------------
    # Rule helpers for :meth:`option_rules`: a bad option fails before any rank touches the
    # wire, on every rank alike, with the strategy's name in the message.
    @classmethod
    def require_positive(cls, **options: float | None) -> None:
        """Each option must be > 0 (None means "unset" and passes)."""
        for key, value in options.items():
            if value is not None and not value > 0:
                raise ValueError(f"strategy {cls.name!r}: {key} must be > 0, got {value!r}")

    @classmethod
    def require_at_least(cls, minimum: float, **options: float | None) -> None:
        """Each option must be >= ``minimum`` (None passes)."""
        for key, value in options.items():
            if value is not None and not value >= minimum:
                raise ValueError(
                    f"strategy {cls.name!r}: {key} must be >= {minimum}, got {value!r}"
                )

    @classmethod
    def require_one_of(cls, key: str, value: Any, choices: tuple[Any, ...]) -> None:
        if value not in choices:
            raise ValueError(
                f"strategy {cls.name!r}: {key} must be one of {list(choices)}, got {value!r}"
            )

    @abstractmethod
    def _all_reduce(self, x: Tensor) -> Handle:
        """Return a handle whose completion leaves the sum in the returned tensor."""

    def _reduce_scatter(self, x: Tensor) -> Handle:
        """Default for any strategy: the library's reduce-scatter on the private group,
        blocking (algorithms and schedules override it)."""
        out = rs_output(x, self.world_size)
        self.stats.count_collective(
            "reduce_scatter", library_wire_bytes("reduce_scatter", x.nbytes, self.world_size)
        )
        library_reduce_scatter(out, x, group=self.group)
        return Handle(self, None, out)

    def _all_gather(self, x: Tensor) -> Handle:
        """Default for any strategy: the library's all-gather on the private group, blocking."""
        out = ag_output(x, self.world_size)
        self.stats.count_collective(
            "all_gather", library_wire_bytes("all_gather", x.nbytes, self.world_size)
        )
        library_all_gather(out, x, group=self.group)
        return Handle(self, None, out)

    # The fused ops, composed from the three collectives above: right for every strategy,
    # third-party plugins included; a strategy overrides what it does better (``shm`` fuses
    # the epilogue into its pass over memory, ``overlap`` pipelines chunks).
    def _all_reduce_add_rmsnorm(
        self, partial: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> Handle:
        return self.then(self._all_reduce(partial), add_rmsnorm, residual, weight, eps)

    def _all_gather_matmul(self, shard: Tensor, weights: list[Tensor]) -> Handle:
        return self.then(self._all_gather(shard), gather_matmul, weights)

    def _matmul_reduce_scatter(self, x: Tensor, weight: Tensor) -> Handle:
        return self._reduce_scatter(self.compute(torch.matmul, x, weight))

    def then(self, handle: Handle, epilogue: Callable[..., Any], *args: Any) -> Handle:
        """A handle whose ``wait()`` waits ``handle`` and returns ``epilogue(result, *args)``,
        run as the op's compute (:meth:`compute`); at once if ``handle`` is already done."""
        if handle.done:
            return Handle(self, None, self.compute(epilogue, handle.wait(), *args))
        return Handle(self, lambda: self.compute(epilogue, handle.wait(), *args))

    def error_bound(self, op: str, inputs: list[Tensor], rank: int) -> Tensor:
        """Per element of ``rank``'s result of ``op`` on every rank's ``inputs`` (in rank
        order), the most it may differ from the exact result (float64, the result's shape).
        Only an inexact strategy states one; an exact one is held to the exact result."""
        raise NotImplementedError(
            f"strategy {self.name!r} states no error bound (an exact strategy is held to the "
            f"exact result)"
        )

    def _flush(self) -> None:
        """Put anything held back (a partly filled bucket) on the wire before handles finish."""

    def _release(self) -> None:
        """Free buffers and threads; called once by ``close()``."""

    def _error(self, problem: str) -> CommError:
        return CommError(f"strategy {self.name!r} (rank {self.rank}): {problem}")

    # -- internals --------------------------------------------------------------------------
    def _new_group(self) -> dist.ProcessGroup:
        # If a subclass's constructor then fails, the group is never released: dropped, not
        # cached, on every rank alike (a failure on one rank only must not leave that rank
        # with a cached group its peers still wait on).
        group, generation = acquire_group(self.ranks, self.backend, self.timeout_s)
        self._leases.append((group, generation))
        return group

    @contextmanager
    def _blocked(self):
        """Add the time spent inside the outermost communicator call to ``wait_s`` (less the
        fused ops' compute, :meth:`compute`)."""
        self._depth += 1
        t0, c0 = time.perf_counter(), self.stats.compute_s
        try:
            if self._depth == 1 and _profiling():
                with record_function(self._blocked_span):
                    yield
            else:
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.stats.wait_s += self._exposed_since(t0, c0)

    def _exposed_since(self, t0: float, c0: float) -> float:
        """Seconds blocked since ``t0`` (``time.perf_counter()``), less the fused ops' own
        compute since then (``stats.compute_s`` was ``c0``): the exposed communication."""
        return max(0.0, time.perf_counter() - t0 - (self.stats.compute_s - c0))

    def _check_open(self) -> None:
        if self._closed:
            raise self._error("used after close()")

    def _check_input(self, x: Any, op: str = "all_reduce") -> None:
        if self._closed:
            raise self._error("used after close()")
        if self._broken:
            raise self._error(
                "unusable after an earlier collective failed half-way (a timeout or a "
                "mismatch): close it and build a new communicator"
            )
        if not isinstance(x, Tensor):
            raise self._error(f"{op} needs a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in self.supported_dtypes:
            ok = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.supported_dtypes))
            raise self._error(f"dtype {x.dtype} is not supported (supported: {ok})")
        # x.device builds a torch.device (about half a microsecond): asked only off the CPU
        kind = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
        if kind not in self.supports[self.backend]:
            raise self._error(
                f"tensor is on {x.device}, which this strategy does not support on the "
                f"{self.backend} backend; it supports {_describe_support(self.supports)}"
            )
        if self._cuda and x.device != self.device:
            raise self._error(
                f"tensor is on {x.device} but this rank's NCCL group works on {self.device} "
                f"(torch.cuda.set_device before building the communicator)"
            )
        if not x.is_contiguous():
            raise self._error(
                f"{op} needs a contiguous tensor (shape {tuple(x.shape)}, strides "
                f"{x.stride()}); call .contiguous() first"
            )
        if op != "all_reduce" and x.dim() == 0:
            raise self._error(f"{op} needs a tensor with a dim 0, got a scalar")
        if op == "reduce_scatter" and x.shape[0] % self.world_size:
            raise self._error(
                f"reduce_scatter needs dim 0 divisible by the group size {self.world_size}, "
                f"got shape {tuple(x.shape)}: pad dim 0 to a multiple of it first"
            )

    def _fingerprint(self, op: int, x: Tensor | None) -> None:
        """Gather (op, seq, dtype, numel, shape) from every rank; raise on all if they differ."""
        self._seq += 1
        shape = tuple(x.shape) if x is not None else ()
        row = [
            op,
            self._seq,
            _DTYPE_CODES.get(x.dtype, -1) if x is not None else -1,
            x.numel() if x is not None else 0,
            len(shape),
        ] + list(shape[:4])
        row += [-1] * (9 - len(row))
        mine = torch.tensor(row, dtype=torch.int64, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine, group=self._check_group)
        rows_l = [r.tolist() for r in rows]
        if all(r == rows_l[0] for r in rows_l):
            return
        self._broken = True
        desc = "; ".join(f"rank {i}: {_describe(r)}" for i, r in enumerate(rows_l))
        odd = [i for i, r in enumerate(rows_l) if r != rows_l[0]]
        raise self._error(f"ranks {[0] + odd} disagree on the next collective: {desc}")


def _describe(row: list[int]) -> str:
    op, seq, _, numel, ndim = row[:5]
    if op in (_OP_FLUSH, _OP_CLOSE):
        return f"{_OP_NAMES[op]} #{seq}"
    dtype = {v: k for k, v in _DTYPE_CODES.items()}.get(row[2])
    shape = tuple(row[5 : 5 + min(ndim, 4)])
    return f"{_OP_NAMES[op]} #{seq} shape {shape} {dtype} numel {numel}"


def _describe_support(supports: dict[str, frozenset[str]]) -> str:
    return "; ".join(f"{b}: {', '.join(sorted(d))} tensors" for b, d in sorted(supports.items()))


def _device_for(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
