"""The all-reduce timing loop that the benchmark and the calibration share, nccl-tests' method.

Per size: untimed warm-up, one barrier, then back-to-back timed iterations. Strategies reduce
in place, so the input is refilled from a saved copy before every iteration, outside the timed
region. Each rank records every iteration; the times are reduced elementwise with MAX over
ranks (the slowest rank sets the pace) and the median over iterations is reported. After the
timed loop a separate check counts the elements that differ from the exact sum
(:mod:`framework.run.inputs`). Also here: the stand-ins the loop and the calibration time
against (a completed handle, a communicator that communicates nothing, the bare library call).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from framework.comm.fused import FusedFromCollectives
from framework.comm.library import (
    ag_output,
    library_all_gather,
    library_reduce_scatter,
    rs_output,
)
from framework.comm.shm import round_trip_s
from framework.comm.stats import CommStats
from framework.costmodel import busbw_gbps
from framework.run.inputs import expected_sum, rank_input
from framework.run.spread import median_interval


def bench_sizes(min_bytes: int, max_bytes: int, factor: int, elem_size: int) -> list[int]:
    """nccl-tests -b/-e/-f: sizes in bytes, whole elements (at least one), duplicates dropped."""
    out: list[int] = []
    size = min_bytes
    while size <= max_bytes:
        nbytes = max(size // elem_size, 1) * elem_size
        if nbytes not in out:
            out.append(nbytes)
        size *= factor
    return out


@dataclass(frozen=True)
class SweepSpec:
    """What :func:`sweep` times: message sizes in bytes, and how often."""

    sizes: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    warmup: int = 5
    iters: int = 20
    many_small: int = 0  # > 0: a burst of this many tensors per iteration, all issued first
    rounds: int = 1  # passes over the communicators, interleaved so drift hits each alike
    memcpy: bool = False  # also time one core copying each size (the memory limit)
    # also measure the host's cache-line round trip between ranks 0 and 1 (shared memory,
    # native code) and each size's copy time: the limit every time is reported against
    limits: bool = False
    # all_reduce | reduce_scatter | all_gather; a size is the whole buffer, as in nccl-tests:
    # the reduce-scatter's input, the all-gather's output (each rank sends size / p)
    op: str = "all_reduce"


class Done:
    """The handle of an all-reduce that has already completed: ``wait()`` returns the tensor."""

    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def wait(self) -> torch.Tensor:
        return self.x


class NoComm(FusedFromCollectives):
    """A communicator that communicates nothing: ``all_reduce`` returns its input.

    A decode run through it is the step's compute alone (wrong sums, but the same shapes and
    kernels; the greedy tokens differ, which a timing does not see)."""

    name = "none"

    def __init__(self) -> None:
        self.stats = CommStats()

    def all_reduce(self, x: torch.Tensor) -> Done:
        return Done(x)

    def reset_stats(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        pass


class RawAllReduce(FusedFromCollectives):
    """The baseline ``raw``: a bare ``torch.distributed.all_reduce``, no framework.

    It runs on a group of its own made by ``dist.new_group`` like ``naive``'s private group,
    so that ``naive`` against ``raw`` in one run isolates what the interface and the counters
    cost. (The default group is not used: gloo timings on this VM differ between groups by
    more than the framework's cost, about 2 us a call, so the comparison would measure that.)"""

    name = "raw"

    def __init__(self, timeout_s: float) -> None:
        self.stats = CommStats()
        self.group = dist.new_group(
            timeout=timedelta(seconds=timeout_s), backend=dist.get_backend()
        )

    def all_reduce(self, x: torch.Tensor) -> Done:
        dist.all_reduce(x, group=self.group)
        return Done(x)

    def reduce_scatter(self, x: torch.Tensor) -> Done:
        out = rs_output(x, dist.get_world_size(self.group))
        library_reduce_scatter(out, x, group=self.group)
        return Done(out)

    def all_gather(self, x: torch.Tensor) -> Done:
        out = ag_output(x, dist.get_world_size(self.group))
        library_all_gather(out, x, group=self.group)
        return Done(out)

    def reset_stats(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        pass


def _refill(xs: list[torch.Tensor], saved: list[torch.Tensor], cuda: bool) -> None:
    for x, s in zip(xs, saved):
        x.copy_(s)
    if cuda:
        torch.cuda.synchronize(xs[0].device)


def _burst(
    comm: Any, xs: list[torch.Tensor], cuda: bool, op: str = "all_reduce"
) -> list[torch.Tensor]:
    """One iteration: every collective issued before any wait (one tensor: issue, wait)."""
    handles = [getattr(comm, op)(x) for x in xs]
    outs = [h.wait() for h in handles]
    if cuda:  # wait() may return before the stream has drained
        torch.cuda.synchronize(xs[0].device)
    return outs


def time_iterations(
    comm: Any, xs: list[torch.Tensor], saved: list[torch.Tensor], iters: int, op: str = "all_reduce"
) -> list[float]:
    """Seconds per iteration on this rank, after a barrier; refills happen outside the timing."""
    cuda = xs[0].device.type == "cuda"
    dist.barrier()
    times = []
    for _ in range(iters):
        _refill(xs, saved, cuda)
        t0 = time.perf_counter()
        _burst(comm, xs, cuda, op)
        times.append(time.perf_counter() - t0)
    return times


def max_over_ranks(x: Any, device: torch.device | None = None) -> Any:
    """Elementwise MAX over the default group's ranks (not a communicator's): a CPU tensor, or
    a float for a scalar. ``device`` is where the backend reduces (cuda for nccl)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu() if t.dim() else t.item()


def slowest_rank_median(times: list[float], device: torch.device | None = None) -> float:
    """Elementwise MAX over ranks (the slowest rank sets the pace), then the median."""
    return statistics.median(max_over_ranks(times, device).tolist())


def memcpy_times(nbytes: int, iters: int, device: torch.device) -> list[float]:
    """Seconds per copy of ``nbytes`` between two buffers by one core: a copy's bandwidth limit.

    Bandwidth is counted nccl-style as bytes copied per second (each byte is read once and
    written once)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def sweep(
    comms: list[Any],
    spec: SweepSpec,
    rank: int,
    world: int,
    device: torch.device,
    labels: list[str] | None = None,
    baseline: bool | None = None,
) -> dict[str, Any]:
    """Time ``comms[0]`` (and ``comms[1:]``, interleaved) at every size; ``comms[1]`` is the
    baseline of the speedup column unless ``baseline=False`` (default: when there is one).

    Returns ``{"rows": one per size, "comm_stats": comms[0]'s counters per iteration}``; a
    row holds size, count, type, redop, time_us, algbw_gbps, busbw_gbps and wrong, plus
    baseline_time_us and speedup with a baseline, memcpy_gbps and busbw_of_memcpy with
    ``spec.memcpy``; with ``labels`` (one per communicator), ``times_us``: every
    communicator's median time by label (the rounds interleave all of them), and
    ``spread_us``: its interval [lo, hi]."""
    elem = torch.empty((), dtype=spec.dtype).element_size()
    k = max(spec.many_small, 1)
    cuda = device.type == "cuda"
    comm = comms[0]
    rows: list[dict[str, Any]] = []
    stats: list[dict[str, Any]] = []
    op = spec.op
    round_trip = round_trip_s(dist.group.WORLD) if spec.limits and not cuda else None
    memcpy = spec.memcpy or round_trip is not None
    for size in spec.sizes:
        count = size // elem
        if op != "all_reduce":  # the whole buffer splits into p equal parts
            count = max(count // world, 1) * world
        nbytes = count * elem
        n_in = count // world if op == "all_gather" else count  # each rank's input
        saved = [rank_input(j, rank, n_in, spec.dtype).to(device) for j in range(k)]
        xs = [s.clone() for s in saved]
        for c in comms:
            for _ in range(spec.warmup):
                _refill(xs, saved, cuda)
                _burst(c, xs, cuda, op)
        comm.reset_stats()
        times: list[list[float]] = [[] for _ in comms]
        for _ in range(spec.rounds):
            for i, c in enumerate(comms):
                times[i] += time_iterations(c, xs, saved, spec.iters, op)
        n_iter = spec.iters * spec.rounds
        st = comm.stats.as_dict()
        stats.append(
            {
                "size": nbytes,
                **{
                    f"{key}_per_iter": st[key] / n_iter
                    for key in ("calls", "collectives", "wire_bytes")
                },
            }
        )
        # per iteration, the slowest rank's time (it sets the pace), once per communicator
        slowest = [max_over_ranks(t, device).tolist() for t in times]
        med = statistics.median(slowest[0])
        algbw = nbytes * k / med / 1e9 if med > 0 else float("nan")
        row = {
            "size": nbytes,
            "count": count,
            "type": str(spec.dtype).removeprefix("torch."),
            "redop": "none" if op == "all_gather" else "sum",  # as nccl-tests prints
            "time_us": round(med * 1e6, 3),
            "p90_us": round(sorted(slowest[0])[int(0.9 * (len(slowest[0]) - 1))] * 1e6, 3),
            "algbw_gbps": _sig(algbw),
            "busbw_gbps": _sig(busbw_gbps(world, nbytes * k, med, op)),
            "wrong": _count_wrong(comms, xs, saved, world, device, op),
        }
        if labels is not None:
            spans = [median_interval([x * 1e6 for x in t]) for t in slowest]
            row["times_us"] = {
                label: round(sp["median"], 3) for label, sp in zip(labels, spans, strict=True)
            }
            # the interval of each median over the iterations (framework.run.spread)
            row["spread_us"] = {
                label: [round(sp["lo"], 3), round(sp["hi"], 3)]
                for label, sp in zip(labels, spans, strict=True)
            }
        if baseline if baseline is not None else len(comms) > 1:
            base = statistics.median(slowest[1])
            row["baseline_time_us"] = round(base * 1e6, 3)
            row["speedup"] = _sig(base / med) if med > 0 else float("nan")
        if memcpy:  # rank 0 alone, the others idle: one core's copy bandwidth
            mem = memcpy_times(nbytes * k, n_iter, device) if rank == 0 else [0.0] * n_iter
            copy_s = slowest_rank_median(mem, device)
            row["memcpy_gbps"] = _sig(nbytes * k / copy_s / 1e9)
            row["busbw_of_memcpy"] = _sig(row["busbw_gbps"] / row["memcpy_gbps"])
            if round_trip is not None:  # the limit: one round trip plus copying the bytes once
                row["round_trip_us"] = round(round_trip * 1e6, 3)
                row["limit_us"] = round((round_trip + copy_s) * 1e6, 3)
                row["of_limit"] = _sig(med / (round_trip + copy_s))
        rows.append(row)
    return {"rows": rows, "comm_stats": stats}


def _count_wrong(
    comms: list[Any],
    xs: list[torch.Tensor],
    saved: list[torch.Tensor],
    world: int,
    device: torch.device,
    op: str = "all_reduce",
) -> int:
    """Elements differing from the exact result after one more burst per communicator, max
    over ranks. Tensor ``j`` of the burst holds :func:`rank_input` with seed ``j``."""
    cuda = device.type == "cuda"
    rank = dist.get_rank()
    want = []
    for j, x in enumerate(xs):
        n = x.numel()
        if op == "all_gather":
            w = torch.cat([rank_input(j, r, n, x.dtype) for r in range(world)])
        elif op == "reduce_scatter":
            w = expected_sum(j, world, n, x.dtype)[rank * n // world : (rank + 1) * n // world]
        else:
            w = expected_sum(j, world, n, x.dtype)
        want.append(w.to(device))
    wrong = 0
    for c in comms:
        _refill(xs, saved, cuda)
        outs = _burst(c, xs, cuda, op)
        wrong += sum(int((o != w).sum().item()) for o, w in zip(outs, want))
    return int(max_over_ranks(float(wrong), device))


def _sig(x: float) -> float:
    """Six significant digits: far below timing noise, and the CSV and report stay readable."""
    return float(f"{x:.6g}")


@contextmanager
def background_load(n: int) -> Iterator[list[int]]:
    """``n`` processes that each keep a core busy while the body runs: a host that is not
    idle, as a user's rarely is (parallel sweep jobs, a build, another user). They are killed
    on exit, and by the kernel if this process dies first (each arms its own parent-death
    signal, then checks its parent is still the one that started it)."""
    spin = (
        "import ctypes, os, signal, sys; "
        "ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0); "
        f"sys.exit(0) if os.getppid() != {os.getpid()} else None\n"
        "while True: pass"
    )
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", spin]))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
