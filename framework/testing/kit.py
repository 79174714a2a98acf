"""The conformance kit: the definition of "correct" for every strategy, built-in or third-party.

Every check runs on every rank of a real process group. Each rank rebuilds every rank's input
from a seed and computes the expected sum itself, so correctness never depends on the strategy
under test. Integer-valued inputs must come back exactly as the library all-reduce gives them;
random floats (order-sensitive) must be within float rounding of a float64 reference and
identical on every rank, since TP ranks must keep identical activations. A strategy that is not
exact (``Communicator.exact`` False: a quantized wire) is held instead to the error bound it
states (``Communicator.error_bound``) around the exact result, in every check, and its
all-reduce and all-gather results must still be the same bits on every rank.

Run it on your strategy (registered in-process or through the entry point)::

    python -m framework.testing my_strategy --world-sizes 1,2,3,4 [--option key=value ...]

or from pytest: ``check_strategy("my_strategy")``.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from framework.comm.communicator import CommError, Communicator
from framework.comm.fused import FUSED_OPS, add_rmsnorm
from framework.comm.library import library_reduce_scatter
from framework.comm.registry import build_communicator
from framework.run.inputs import rank_input as _cpu_input

EXACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64)
CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {}


def check(fn: Callable[[str, dict[str, Any]], None]):
    CHECKS[fn.__name__] = fn
    return fn


def _me() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


# The device the checks put their inputs on (``run_checks(device=...)``): CPU by default; CUDA
# for gloo with CUDA tensors (several ranks may share one GPU) or NCCL. Expected values are
# always computed on the CPU, independently of the strategy.
_device = torch.device("cpu")


def rank_input(seed: int, rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return _cpu_input(seed, rank, numel, dtype).to(_device)


def _ones(*shape: int, **kw: Any) -> torch.Tensor:
    return torch.ones(*shape, device=kw.pop("device", _device), **kw)


@contextmanager
def _opened(name: str, options: dict[str, Any], **extra: Any) -> Iterator[Communicator]:
    """A communicator for one check, closed however the check ends."""
    comm = build_communicator(name, **{**options, **extra})
    try:
        yield comm
    finally:
        comm.close()


def _inputs(seed: int, world: int, shape: tuple[int, ...], dtype: torch.dtype):
    """Every rank's :func:`rank_input` for one call, on the CPU, in ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    return [_cpu_input(seed, j, numel, dtype).view(shape) for j in range(world)]


def _exact(op: str, inputs: list[torch.Tensor], rank: int) -> torch.Tensor:
    """The exact (float64) result of ``op`` on ``rank`` for every rank's ``inputs``."""
    if op == "all_gather":
        return torch.cat([x.double() for x in inputs])
    total = sum(x.double() for x in inputs)
    if op == "all_reduce":
        return total
    rows = total.shape[0] // len(inputs)
    return total[rank * rows : (rank + 1) * rows]


def _expect_result(
    comm: Communicator,
    op: str,
    got: torch.Tensor,
    seed: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    what: str,
) -> None:
    """``op`` on every rank's :func:`rank_input` (``seed``, each rank's input ``shape``):
    exactly the exact result (summed in float64, cast to ``dtype`` once, as the library gives
    it), or for an inexact ``comm`` within its stated bound of it."""
    inputs = _inputs(seed, dist.get_world_size(), shape, dtype)
    want = _exact(op, inputs, dist.get_rank()).to(dtype)
    _expect_equal(got, want, what, comm, op, inputs)


def _expect_within(
    comm: Communicator, op: str, got: torch.Tensor, inputs: list[torch.Tensor], what: str
) -> None:
    """An inexact strategy: within its stated bound of the exact result, in the input's dtype
    and shape, and (all-reduce, all-gather) the same bits on every rank."""
    rank = dist.get_rank()
    want = _exact(op, inputs, rank)
    bound = comm.error_bound(op, inputs, rank)
    host = got.cpu()
    if host.dtype != inputs[0].dtype or host.shape != want.shape:
        raise AssertionError(
            f"{what}: got {host.dtype} {tuple(host.shape)}, want "
            f"{inputs[0].dtype} {tuple(want.shape)}"
        )
    err = (host.double() - want).abs()
    if not bool((err <= bound).all()):  # NaN fails too
        i = int(torch.nan_to_num(err - bound, nan=float("inf")).view(-1).argmax())
        raise AssertionError(
            f"{what}: beyond the strategy's stated error bound at index {i}: got "
            f"{host.view(-1)[i].item()}, exact {want.view(-1)[i].item()}, bound "
            f"{bound.view(-1)[i].item():.3g}"
        )
    if op != "reduce_scatter":
        _expect_same_everywhere(got, what)


def _expect_same_everywhere(got: torch.Tensor, what: str) -> None:
    if dist.get_backend() == "nccl":  # NCCL gathers CUDA tensors only
        got = got.to(_device)
    copies = [torch.empty_like(got) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, got.contiguous())
    if not all(torch.equal(c, got) for c in copies):
        raise AssertionError(f"{what}: ranks received different results")


def _expect_equal(
    got: torch.Tensor,
    want: torch.Tensor,
    what: str,
    comm: Communicator | None = None,
    op: str = "all_reduce",
    inputs: list[torch.Tensor] | None = None,
) -> None:
    """Exactly ``want``; for an inexact ``comm``, within its bound of ``op`` on ``inputs``."""
    if comm is not None and not comm.exact:
        _expect_within(comm, op, got, inputs, what)
        return
    got, want = got.cpu(), want.cpu()
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        bad = (got.to(torch.float64) != want.to(torch.float64)).nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{what}: result differs from the exact sum (first bad index "
            f"{bad}, got {got.flatten()[:4].tolist()}, "
            f"want {want.flatten()[:4].tolist()})"
        )


@check
def exact_sums(name: str, options: dict[str, Any]) -> None:
    """Every dtype, sizes 1, odd, and several MiB: exactly the sum, as the library gives it."""
    rank = dist.get_rank()
    with _opened(name, options) as comm:
        for k, dtype in enumerate(EXACT_DTYPES):
            esize = torch.empty((), dtype=dtype).element_size()
            for numel in (1, 7, 4099, (3 << 20) // esize + 3):
                seed = numel + 97 * k
                x = rank_input(seed, rank, numel, dtype)
                got = comm.all_reduce(x).wait()
                _expect_result(
                    comm, "all_reduce", got, seed, (numel,), dtype, f"{dtype} numel {numel}"
                )
        lib = rank_input(5, rank, 1000, torch.int64)
        dist.all_reduce(lib)  # the library collective itself, on the default group
        _expect_equal(
            comm.all_reduce(rank_input(5, rank, 1000, torch.int64)).wait(),
            lib,
            "against torch.distributed.all_reduce",
        )


@check
def float_order(name: str, options: dict[str, Any]) -> None:
    """Random floats: within rounding of a float64 sum, and bit-identical on every rank."""
    rank, world = _me()
    with _opened(name, options) as comm:
        for numel in (5, 10_001):
            xs = [
                torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(world)
            ]
            got = comm.all_reduce(xs[rank].clone().to(_device)).wait().cpu()
            if not comm.exact:
                _expect_within(comm, "all_reduce", got, xs, f"random float32 sum of {numel}")
                continue
            ref = sum(x.double() for x in xs)
            # any summation order of p float32 terms is within (p-1)*eps*sum|x| of the exact sum
            bound = (world - 1) * torch.finfo(torch.float32).eps * sum(x.abs() for x in xs)
            if not bool(((got.double() - ref).abs() <= bound.double() + 1e-30).all()):
                raise AssertionError(f"float sum of {numel} beyond rounding of float64 reference")
            _expect_same_everywhere(got, "random float32 sum")


def _shapes(world: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """(rows per rank, columns): one element and odd sizes in every dtype, and a message of
    about 1 MiB (several shm chunks of the default size once gathered) in a 4- and a 2-byte
    dtype (the large-message paths do not depend on the dtype beyond its size)."""
    shapes = [(1, 1), (3, 7)]
    if dtype in (torch.float32, torch.bfloat16):
        esize = torch.empty((), dtype=dtype).element_size()
        shapes.append(((1 << 20) // (257 * esize * world) + 1, 257))
    return shapes


@check
def scatter_gather_exact(name: str, options: dict[str, Any]) -> None:
    """reduce_scatter and all_gather, every dtype, one element to several MiB: this rank's rows
    of the exact sum, and every rank's input in rank order, as the library gives them."""
    rank, world = _me()
    with _opened(name, options) as comm:
        for k, dtype in enumerate(EXACT_DTYPES):
            for rows, cols in _shapes(world, dtype):
                seed = 1000 + rows + 31 * k
                x = rank_input(seed, rank, world * rows * cols, dtype).view(world * rows, cols)
                got = comm.reduce_scatter(x).wait()
                what = f"reduce_scatter {dtype} {tuple(x.shape)}"
                _expect_result(comm, "reduce_scatter", got, seed, tuple(x.shape), dtype, what)
                y = rank_input(seed, rank, rows * cols, dtype).view(rows, cols)
                got = comm.all_gather(y).wait()
                what = f"all_gather {dtype} {tuple(y.shape)}"
                _expect_result(comm, "all_gather", got, seed, (rows, cols), dtype, what)
        lib_in = rank_input(6, rank, world * 10, torch.int64)
        lib = torch.empty(10, dtype=torch.int64, device=_device)
        library_reduce_scatter(lib, lib_in.clone())  # the library itself, default group
        _expect_equal(comm.reduce_scatter(lib_in).wait(), lib, "against reduce_scatter_tensor")
        s = comm.stats.by_op
        calls = sum(len(_shapes(world, d)) for d in EXACT_DTYPES) + 1
        if s["reduce_scatter"]["calls"] != calls or s["all_reduce"]["calls"]:
            raise AssertionError(f"per-op counters wrong: {s}")


@check
def scatter_gather_floats(name: str, options: dict[str, Any]) -> None:
    """Random floats: reduce_scatter within rounding of a float64 sum, all_gather bit-exact;
    a dim 0 that does not divide by the group size is refused on every rank."""
    rank, world = _me()
    with _opened(name, options) as comm:
        xs = [
            torch.randn(world * 5, 3, generator=torch.Generator().manual_seed(r))
            for r in range(world)
        ]
        got = comm.reduce_scatter(xs[rank].clone().to(_device)).wait().cpu()
        ref = sum(x.double() for x in xs)[rank * 5 : (rank + 1) * 5]
        mag = sum(x.abs() for x in xs)[rank * 5 : (rank + 1) * 5].double()
        bound = (world - 1) * torch.finfo(torch.float32).eps * mag
        if not comm.exact:
            _expect_within(comm, "reduce_scatter", got, xs, "reduce_scatter random floats")
        elif not bool(((got.double() - ref).abs() <= bound + 1e-30).all()):
            raise AssertionError("reduce_scatter float sum beyond rounding of the reference")
        got = comm.all_gather(xs[rank][:4].clone().to(_device)).wait().cpu()
        if not comm.exact:
            parts = [x[:4] for x in xs]
            _expect_within(comm, "all_gather", got, parts, "all_gather random floats")
        elif not torch.equal(got, torch.cat([x[:4] for x in xs])):
            raise AssertionError("all_gather changed the bits of a float input")
        if world > 1:
            _expect_comm_error(
                lambda: comm.reduce_scatter(_ones(world + 1, 2)), name, "uneven dim 0"
            )
        _expect_comm_error(lambda: comm.all_gather(_ones(())), name, "scalar all_gather")


@check
def mixed_ops_in_flight(name: str, options: dict[str, Any]) -> None:
    """The three ops interleaved, several in flight, waited out of order."""
    rank, world = _me()
    with _opened(name, options) as comm:
        calls = []
        for i, (op, rows, dtype) in enumerate(
            [
                ("all_reduce", 5, torch.float32),
                ("reduce_scatter", 3, torch.float32),
                ("all_gather", 2, torch.int32),
                ("reduce_scatter", 1, torch.int64),
                ("all_reduce", 9, torch.int32),
                ("all_gather", 7, torch.float32),
            ]
        ):
            seed = 2000 + i
            shape = (world * rows, 4) if op == "reduce_scatter" else (rows, 4)
            x = rank_input(seed, rank, shape[0] * 4, dtype).view(shape)
            calls.append((op, getattr(comm, op)(x), seed, shape, dtype))
        for op, h, seed, shape, dtype in reversed(calls):
            _expect_result(comm, op, h.wait(), seed, shape, dtype, f"{op} waited out of order")
        if comm.pending:
            raise AssertionError(f"{comm.pending} handles still pending after every wait")


@check
def handles_in_flight(name: str, options: dict[str, Any]) -> None:
    """Several handles in flight, mixed dtypes, waited out of order; writing results is safe."""
    rank = dist.get_rank()
    with _opened(name, options) as comm:
        specs = [
            (31, torch.float32),
            (1024, torch.int64),
            (3, torch.bfloat16),
            (5000, torch.float32),
            (17, torch.int32),
            (1, torch.float16),
        ]
        handles = [comm.all_reduce(rank_input(i, rank, n, dt)) for i, (n, dt) in enumerate(specs)]
        for i in reversed(range(len(specs))):
            n, dt = specs[i]
            got = handles[i].wait()
            _expect_result(comm, "all_reduce", got, i, (n,), dt, f"handle {i} waited out of order")
            got.fill_(99)  # the caller owns the result now; later results must not see this
        for i in range(3):
            a = comm.all_reduce(rank_input(40 + i, rank, 64, torch.float32))
            b = comm.all_reduce(rank_input(50 + i, rank, 64, torch.float32))
            ya = a.wait()
            ya.zero_()
            what = "result after the caller overwrote an earlier one"
            _expect_result(comm, "all_reduce", b.wait(), 50 + i, (64,), torch.float32, what)
        if comm.pending:
            raise AssertionError(f"{comm.pending} handles still pending after every wait")


@check
def flush_semantics(name: str, options: dict[str, Any]) -> None:
    """flush() with nothing pending is a no-op; flush() completes every pending handle."""
    rank = dist.get_rank()
    with _opened(name, options) as comm:
        comm.flush()
        hs = [
            comm.all_reduce(rank_input(60 + i, rank, 100 * (i + 1), torch.float32))
            for i in range(3)
        ]
        comm.flush()
        if comm.pending or not all(h.done for h in hs):
            raise AssertionError("flush() left handles pending")
        for i, h in enumerate(hs):
            shape = (100 * (i + 1),)
            _expect_result(
                comm, "all_reduce", h.wait(), 60 + i, shape, torch.float32, "result after flush"
            )
        comm.flush()


@check
def bounded_loop(name: str, options: dict[str, Any]) -> None:
    """1,000 calls: results stay right and buffers and pending handles stay bounded."""
    rank = dist.get_rank()
    with _opened(name, options) as comm:
        x = rank_input(7, rank, 256, torch.float32)
        allocs_after_warmup = None
        for step in range(250):
            hs = [comm.all_reduce(x.clone()) for _ in range(4)]
            for h in hs:
                got = h.wait()
            if step == 10:
                allocs_after_warmup = comm.stats.buffer_allocs
            if comm.pending > 8:
                raise AssertionError(f"{comm.pending} handles pending in a wait-all loop")
        _expect_result(comm, "all_reduce", got, 7, (256,), torch.float32, "last result of the loop")
        if comm.stats.calls != 1000:
            raise AssertionError(f"stats.calls is {comm.stats.calls}, expected 1000")
        if comm.stats.buffer_allocs != allocs_after_warmup:
            raise AssertionError(
                f"buffers keep being allocated: {allocs_after_warmup} after "
                f"warm-up, {comm.stats.buffer_allocs} at the end"
            )


@check
def stats_counters(name: str, options: dict[str, Any]) -> None:
    """calls, bytes, collectives and wait_s move as documented; reset_stats() zeroes them."""
    rank, world = _me()
    with _opened(name, options) as comm:
        for i in range(3):
            comm.all_reduce(rank_input(i, rank, 10, torch.float32)).wait()
        s = comm.stats
        if (s.calls, s.bytes) != (3, 120) or not 1 <= s.collectives <= 3 or s.wait_s <= 0:
            raise AssertionError(f"unexpected stats after 3 calls of 40 bytes: {s}")
        if world > 1 and s.wire_bytes <= 0:
            raise AssertionError("wire_bytes not counted")
        comm.reset_stats()
        if (s.calls, s.collectives, s.bytes, s.wire_bytes, s.wait_s) != (0, 0, 0, 0, 0.0):
            raise AssertionError(f"reset_stats() left {s}")


def _expect_comm_error(fn: Callable[[], Any], name: str, what: str) -> str:
    try:
        fn()
    except CommError as e:
        if name not in str(e):
            raise AssertionError(f"{what}: error does not name the strategy: {e}") from e
        return str(e)
    raise AssertionError(f"{what}: no error raised")


@check
def bad_input(name: str, options: dict[str, Any]) -> None:
    """Clear errors on the calling rank, before anything goes on the wire."""
    with _opened(name, options) as comm:
        _expect_comm_error(lambda: comm.all_reduce(_ones(4, 4).t()), name, "non-contiguous")
        _expect_comm_error(
            lambda: comm.all_reduce(torch.ones(4, device="meta")), name, "wrong device"
        )
        _expect_comm_error(
            lambda: comm.all_reduce(_ones(4, dtype=torch.complex64)), name, "unsupported dtype"
        )
        _expect_comm_error(lambda: comm.all_reduce([1.0]), name, "not a tensor")
    _expect_comm_error(lambda: comm.all_reduce(_ones(4)), name, "use after close()")


@check
def validate_mismatch(name: str, options: dict[str, Any]) -> None:
    """validate=True: a shape mismatch or an extra call raises on EVERY rank, naming ranks."""
    rank, world = _me()
    with _opened(name, options, validate=True) as comm:
        comm.all_reduce(_ones(8)).wait()
        if world == 1:
            return
        n = 8 if rank == 0 else 9
        msg = _expect_comm_error(
            lambda: comm.all_reduce(_ones(n)).wait(), name, "shape mismatch with validate=True"
        )
        if "ranks [0, 1" not in msg:
            raise AssertionError(f"mismatch error does not name the ranks: {msg}")
    with _opened(name, options, validate=True) as comm:

        def extra_call() -> None:
            if rank == world - 1:
                comm.all_reduce(_ones(2)).wait()
            comm.flush()

        _expect_comm_error(extra_call, name, "extra all_reduce on one rank with validate=True")
    if world == 1:
        return
    with _opened(name, options, validate=True) as comm:
        x = _ones(world * 2, 3)
        msg = _expect_comm_error(
            lambda: (comm.all_gather(x) if rank == 0 else comm.reduce_scatter(x)).wait(),
            name,
            "different ops with validate=True",
        )
        if "all_gather" not in msg or "reduce_scatter" not in msg:
            raise AssertionError(f"mismatch error does not name both ops: {msg}")


def _fused_inputs(seed: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Random floats of a TP layer's scale (the same on every rank for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(_device)


def _expect_close_matmul(
    got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, k: int, what: str
) -> None:
    """A row-chunked matmul against the whole one: within ``(k + p) u |x||w|`` per element
    (k products summed, p ranks' partials; u the dtype's unit roundoff, float32's for the
    accumulation of 16-bit types), the textbook bound of a dot product's rounding."""
    u = torch.finfo(got.dtype).eps
    bound = (k + dist.get_world_size()) * u * scale.double() + 1e-30
    err = (got.cpu().double() - want.cpu().double()).abs()
    if got.shape != want.shape or not bool((err <= bound.cpu()).all()):
        worst = float((err - bound.cpu()).max()) if got.shape == want.shape else float("nan")
        raise AssertionError(f"{what}: beyond the chunked-matmul tolerance by {worst:.3g}")


@check
def fused_ops(name: str, options: dict[str, Any]) -> None:
    """The fused ops against their composition from the same communicator's collectives:
    the same bits where the strategy keeps the summation order, within the stated matmul
    tolerance for the ops it chunks (``Communicator.chunked_ops``); identical on every rank;
    several in flight waited out of order; counted under their own names."""
    rank, world = _me()
    with _opened(name, options) as comm:
        chunked = comm.chunked_ops
        dtypes = [torch.float32, torch.bfloat16]
        cases = [(1, 1), (3, 7), (8, 64), (64, 1024)]  # the last: 256 KiB in float32
        n_calls = 0
        for k, dtype in enumerate(dtypes):
            for rows, hidden in cases[: 3 + (dtype == torch.float32)]:
                seed = 7000 + 101 * k + rows
                what = f"{dtype} ({rows}, {hidden})"
                partial = _fused_inputs(seed + rank, (rows, hidden), dtype)
                residual = _fused_inputs(seed - 1, (rows, hidden), dtype)
                weight = _fused_inputs(seed - 2, (hidden,), dtype)
                summed = comm.all_reduce(partial.clone()).wait()
                want = add_rmsnorm(summed, residual, weight, 1e-5)
                got = comm.all_reduce_add_rmsnorm(partial, residual, weight, 1e-5).wait()
                n_calls += 1
                for g, w, part in zip(got, want, ("normed", "new_residual")):
                    _expect_equal(g, w, f"all_reduce_add_rmsnorm {part} {what}")
                    _expect_same_everywhere(g, f"all_reduce_add_rmsnorm {part} {what}")

                shard = _fused_inputs(seed + 10 + rank, (rows, hidden), dtype)
                ws = [
                    _fused_inputs(seed + 20 + i, (hidden, c), dtype) for i, c in enumerate((5, 3))
                ]
                gathered = comm.all_gather(shard).wait()
                g_all, outs = comm.all_gather_matmul(shard, ws).wait()
                n_calls += 1
                _expect_equal(g_all, gathered, f"all_gather_matmul gathered {what}")
                for i, (o, w) in enumerate(zip(outs, ws)):
                    want_o = torch.matmul(gathered, w)
                    if "all_gather_matmul" in chunked:
                        scale = torch.matmul(gathered.abs().float(), w.abs().float())
                        _expect_close_matmul(o, want_o, scale, hidden, f"agm out {i} {what}")
                    else:
                        _expect_equal(o, want_o, f"all_gather_matmul out {i} {what}")

                x = _fused_inputs(seed + 30 + rank, (world * rows, hidden), dtype)
                w = _fused_inputs(seed + 31, (hidden, 6), dtype)
                want_rs = comm.reduce_scatter(torch.matmul(x, w)).wait()
                got_rs = comm.matmul_reduce_scatter(x, w).wait()
                n_calls += 1
                if "matmul_reduce_scatter" in chunked:
                    mags = [
                        _fused_inputs(seed + 30 + j, (world * rows, hidden), dtype).abs().float()
                        for j in range(world)
                    ]
                    scale = sum(torch.matmul(m, w.abs().float()) for m in mags)
                    scale = scale[rank * rows : (rank + 1) * rows]
                    _expect_close_matmul(got_rs, want_rs, scale, hidden, f"mrs {what}")
                else:
                    _expect_equal(got_rs, want_rs, f"matmul_reduce_scatter {what}")

        # in flight together, waited out of order
        partial, residual = _ones(4, 8) * (rank + 1), _ones(4, 8)
        h1 = comm.all_reduce_add_rmsnorm(partial, residual, _ones(8), 1e-6)
        h2 = comm.matmul_reduce_scatter(_ones(2 * world, 8), _ones(8, 2))
        h3 = comm.all_gather_matmul(_ones(3, 8), [_ones(8, 1)])
        _, (out3,) = h3.wait()
        got2 = h2.wait()
        normed, new_res = h1.wait()
        n_calls += 3
        total = world * (world + 1) // 2
        if not (
            torch.equal(new_res.cpu(), torch.full((4, 8), 1.0 + total))
            and torch.allclose(normed.cpu(), torch.ones(4, 8))
            and torch.equal(got2.cpu(), torch.full((2, 2), 8.0 * world))
            and torch.equal(out3.cpu(), torch.full((3 * world, 1), 8.0))
        ):
            raise AssertionError("fused ops waited out of order gave wrong results")
        if comm.pending:
            raise AssertionError(f"{comm.pending} handles still pending after every wait()")
        s = comm.stats.by_op
        fused_calls = sum(s[op]["calls"] for op in FUSED_OPS)
        if fused_calls != n_calls:
            raise AssertionError(f"fused ops counted {fused_calls} calls, made {n_calls}: {s}")


@check
def fused_bad_input(name: str, options: dict[str, Any]) -> None:
    """Bad shapes, dtypes and weights refused on the calling rank with a ``CommError`` naming
    the strategy and the op; with ``validate=True`` a fused op on one rank and a plain one on
    another is an error on every rank naming both ops."""
    rank, world = _me()
    with _opened(name, options) as comm:
        x, w8 = _ones(4, 8), _ones(8)
        bad = {
            "all_reduce_add_rmsnorm": [
                lambda: comm.all_reduce_add_rmsnorm(x, _ones(4, 7), w8, 1e-6),
                lambda: comm.all_reduce_add_rmsnorm(x, _ones(4, 8), _ones(7), 1e-6),
                lambda: comm.all_reduce_add_rmsnorm(x, _ones(4, 8, dtype=torch.float64), w8, 1e-6),
                lambda: comm.all_reduce_add_rmsnorm(
                    _ones(4, 8, dtype=torch.int32), _ones(4, 8, dtype=torch.int32), w8, 1e-6
                ),
                lambda: comm.all_reduce_add_rmsnorm(x, _ones(4, 8), w8, -1.0),
            ],
            "all_gather_matmul": [
                lambda: comm.all_gather_matmul(x, []),
                lambda: comm.all_gather_matmul(x, [_ones(7, 2)]),
                lambda: comm.all_gather_matmul(_ones(8), [_ones(8, 2)]),
                lambda: comm.all_gather_matmul(x, [_ones(8, 2, dtype=torch.bfloat16)]),
            ],
            "matmul_reduce_scatter": [
                lambda: comm.matmul_reduce_scatter(_ones(world * 2, 8), _ones(7, 2)),
                lambda: comm.matmul_reduce_scatter(_ones(world * 2, 8), _ones(8)),
            ],
        }
        if world > 1:
            bad["matmul_reduce_scatter"].append(
                lambda: comm.matmul_reduce_scatter(_ones(world + 1, 8), _ones(8, 2))
            )
        for op, calls in bad.items():
            for i, call in enumerate(calls):
                msg = _expect_comm_error(call, name, f"{op} bad input {i}")
                if op not in msg:
                    raise AssertionError(f"{op} bad input {i}: error does not name the op: {msg}")
        if comm.stats.calls:
            raise AssertionError("a refused call was counted")
    if world == 1:
        return
    with _opened(name, options, validate=True) as comm:
        x = _ones(4, 8)
        msg = _expect_comm_error(
            lambda: (
                comm.all_reduce_add_rmsnorm(x, _ones(4, 8), _ones(8), 1e-6)
                if rank == 0
                else comm.all_reduce(x)
            ).wait(),
            name,
            "fused and plain op with validate=True",
        )
        if "all_reduce_add_rmsnorm" not in msg or "all_reduce #" not in msg:
            raise AssertionError(f"mismatch error does not name both ops: {msg}")


def run_checks(
    name: str,
    options: dict[str, Any] | None = None,
    checks: list[str] | None = None,
    device: str = "cpu",
) -> list[str]:
    """Run the kit's checks on this rank (call on every rank); return the names that passed.

    ``device="cuda"``: inputs are CUDA tensors on GPU ``rank mod count`` (ranks may share a
    GPU: gloo stages CUDA tensors through host memory; NCCL needs a GPU per rank)."""
    global _device
    if device == "cuda":
        _device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(_device)
    else:
        _device = torch.device(device)
    options = dict(options or {})
    passed = []
    for check_name in checks or list(CHECKS):
        try:
            CHECKS[check_name](name, options)
        except Exception as e:
            raise AssertionError(
                f"strategy {name!r} failed check {check_name!r} on rank "
                f"{dist.get_rank()} of {dist.get_world_size()}: {e}"
            ) from e
        passed.append(check_name)
    return passed


def check_strategy(
    name: str,
    world_sizes: tuple[int, ...] = (1, 2, 3, 4),
    timeout_s: float = 300.0,
    device: str = "cpu",
    backend: str = "gloo",
    **options: Any,
) -> None:
    """Spawn ranks for each world size and run every check on ``name``; raise on failure."""
    from framework.testing.rankpool import RankPool

    for ws in world_sizes:
        pool = RankPool(ws, backend=backend)
        try:
            pool.run(run_checks, name, options, None, device, timeout_s=timeout_s)
        finally:
            pool.close()
        print(
            f"{name}: world size {ws} ({backend}, {device} tensors): {len(CHECKS)} checks passed",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m framework.testing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("strategy")
    ap.add_argument("--world-sizes", default="1,2,3,4")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    opts = {}
    for kv in args.option:
        key, _, val = kv.partition("=")
        try:
            opts[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            opts[key] = val
    sizes = tuple(int(s) for s in args.world_sizes.split(","))
    check_strategy(args.strategy, sizes, device=args.device, backend=args.backend, **opts)
    return 0
