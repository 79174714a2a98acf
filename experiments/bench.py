"""nccl-tests-style all-reduce benchmark of a strategy: ``python -m experiments.bench [overrides]``.

Examples::

    python -m experiments.bench strategy=tree parallel.world_size=4 bench.max_bytes=4194304
    python -m experiments.bench strategy=bucketed bench.many_small=16 logger=none
    python -m experiments.bench -m experiment=bench_sizes

Sizes follow nccl-tests ``-b/-e/-f``: from ``bench.min_bytes`` to ``bench.max_bytes``, multiplied
by ``bench.factor`` each step; each size is rounded down to a multiple of the element size (at
least one element), and a size that rounds to one already measured is skipped.

Timing, per size: ``bench.warmup`` untimed iterations, one ``dist.barrier()``, then
``bench.iters`` back-to-back timed iterations. An iteration is ``comm.all_reduce(x).wait()``
(or, with ``bench.many_small=K``, K independent all-reduces of ``size`` bytes each issued before
any wait, then every wait: the whole burst is timed). Strategies reduce in place, so the input is
refilled from a saved copy before every iteration, outside the timed region. Each rank records
every iteration's time; the times are reduced elementwise with MAX over ranks (the slowest rank
sets the pace), and the reported ``time`` is the MEDIAN over iterations of those maxima.

``algbw`` = bytes reduced per iteration / time (with many_small, K * size: the whole burst),
``busbw`` = algbw * 2(n-1)/n (nccl-tests' all-reduce convention; 0 for n = 1); GB/s = 1e9 B/s.
``#wrong`` is a separate correctness check after the timed loop: every rank fills its input with
small integers from (rank, index, tensor) that are exact in every dtype, runs one more
all-reduce (burst) and counts the elements that differ from the sum it computes itself from
every rank's formula (max over ranks).

The job process prints the table, writes ``bench.csv`` (the columns of :data:`CSV_COLUMNS`) and
``results.json`` (``size_results`` = the rows) in the run directory, logs the rows as a W&B
table and attaches ``bench.csv``. The returned objective (what a Hydra sweeper optimises) is
the busbw in GB/s of the largest size (median-time based, as in the table; 0 for one rank).
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import experiments.configs  # noqa: F401  (registers the structured configs)
from experiments.common import atomic_open, run_job, strategy_options_from
from experiments.configs import BenchSpec
from experiments.report import plot_bench
from framework.comm.communicator import CommStats
from framework.comm.profiling import profiled
from framework.comm.registry import (
    available_strategies,
    build_communicator,
    get_strategy,
)
from framework.run.launch import launch_ranks
from framework.run.spec import (
    ConfigError,
    ParallelSpec,
    parallel_problems,
    resolve_backend,
    strategy_problems,
)

BENCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}
CSV_COLUMNS = ["size", "count", "type", "redop", "time_us", "algbw_gbps", "busbw_gbps", "wrong",
               "strategy", "world_size", "mode", "tensors", "baseline", "baseline_time_us",
               "speedup", "memcpy_gbps", "busbw_of_memcpy"]
# Check values: (i + 2 * rank + 3 * tensor) % 7 - 3 lies in [-3, 3]; a sum over n ranks is an
# integer of magnitude <= 3n, exact in bfloat16 (8-bit mantissa) up to n = 85 ranks.
_PERIOD, _OFFSET = 7, 3


# -- configuration -------------------------------------------------------------------------
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


def validate_bench(name: str, opts: dict[str, Any], bench: BenchSpec,
                   parallel: ParallelSpec) -> None:
    """Raise ConfigError listing every problem, before any rank is spawned."""
    problems: list[str] = []
    b = bench
    if b.min_bytes <= 0:
        problems.append(f"bench.min_bytes must be > 0, got {b.min_bytes}")
    if b.max_bytes < b.min_bytes:
        problems.append(f"bench.max_bytes must be >= bench.min_bytes ({b.min_bytes}), "
                        f"got {b.max_bytes}")
    if not isinstance(b.factor, int) or isinstance(b.factor, bool) or b.factor < 2:
        problems.append(f"bench.factor must be an integer >= 2 (sizes are multiplied by it), "
                        f"got {b.factor!r}")
    if b.warmup < 0:
        problems.append(f"bench.warmup must be >= 0, got {b.warmup}")
    if b.iters < 1:
        problems.append(f"bench.iters must be >= 1, got {b.iters}")
    if b.many_small < 0:
        problems.append(f"bench.many_small must be >= 0 (0: one tensor per iteration), "
                        f"got {b.many_small}")
    if b.dtype not in BENCH_DTYPES:
        problems.append(f"bench.dtype must be one of {list(BENCH_DTYPES)}, got {b.dtype!r}")
    if b.rounds < 1:
        problems.append(f"bench.rounds must be >= 1, got {b.rounds}")
    if b.baseline is not None and b.baseline != "raw":
        problems += strategy_problems(b.baseline, {})
    problems += parallel_problems(parallel) + strategy_problems(name, opts)
    dtype = BENCH_DTYPES.get(b.dtype)
    if name in available_strategies() and dtype is not None:
        supported = get_strategy(name).supported_dtypes
        if dtype not in supported:
            ok = sorted(str(t).removeprefix("torch.") for t in supported)
            problems.append(f"strategy {name!r} does not support bench.dtype={b.dtype}; it "
                            f"supports {ok}")
    if problems:
        raise ConfigError("invalid bench configuration:\n  - " + "\n  - ".join(problems))


def mode_name(many_small: int) -> str:
    return f"many_small:{many_small}" if many_small > 0 else "single"


# -- on every rank ---------------------------------------------------------------------------
def _pattern(rank: int, tensor: int, count: int) -> torch.Tensor:
    """This rank's check values for tensor ``tensor``: small integers, as int64."""
    i = torch.arange(count, dtype=torch.int64)
    return (i + 2 * rank + 3 * tensor) % _PERIOD - _OFFSET


def _expected(world: int, tensor: int, count: int) -> torch.Tensor:
    total = torch.zeros(count, dtype=torch.int64)
    for r in range(world):
        total += _pattern(r, tensor, count)
    return total


class RawAllReduce:
    """The baseline ``raw``: a bare ``torch.distributed.all_reduce``, no framework.

    It runs on a group of its own made by ``dist.new_group`` like ``naive``'s private group,
    so that ``naive`` against ``raw`` in one run isolates what the interface and the counters
    cost. (The default group is not used: gloo timings on this VM differ between groups by
    more than the framework's cost, about 2 us a call, so the comparison would measure that.)"""

    name = "raw"

    def __init__(self, timeout_s: float) -> None:
        self.stats = CommStats()
        self.group = dist.new_group(timeout=timedelta(seconds=timeout_s),
                                    backend=dist.get_backend())

    def all_reduce(self, x: torch.Tensor) -> Any:
        dist.all_reduce(x, group=self.group)
        return _Done(x)

    def reset_stats(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        pass


class _Done:
    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def wait(self) -> torch.Tensor:
        return self.x


def _build(name: str, opts: dict[str, Any], parallel: ParallelSpec) -> Any:
    if name == "raw":
        return RawAllReduce(parallel.timeout_s)
    opts = dict(opts)
    opts.setdefault("timeout_s", parallel.timeout_s)
    return build_communicator(name, **opts)


def _rank_bench(fabric: Any, name: str, opts: dict[str, Any], bench: BenchSpec,
                parallel: ParallelSpec, profile: bool = False, out_dir: str = ".") -> dict:
    torch.set_num_threads(parallel.threads_per_rank)
    comms = [_build(name, opts, parallel)]
    try:
        if bench.baseline:
            comms.append(_build(bench.baseline, {}, parallel))
        with profiled(profile, out_dir, fabric.global_rank, fabric.device.type == "cuda"):
            return _sweep(fabric, comms, bench)
    finally:
        for c in comms:
            c.close()


def _refill(xs: list[torch.Tensor], saved: list[torch.Tensor], cuda: bool) -> None:
    for x, s in zip(xs, saved):
        x.copy_(s)
    if cuda:
        torch.cuda.synchronize(xs[0].device)


def _burst(comm: Any, xs: list[torch.Tensor], cuda: bool) -> None:
    """One iteration: every all-reduce issued before any wait (one tensor: issue, wait)."""
    handles = [comm.all_reduce(x) for x in xs]
    for h in handles:
        h.wait()
    if cuda:  # wait() may return before the stream has drained
        torch.cuda.synchronize(xs[0].device)


def _timed(comm: Any, xs: list[torch.Tensor], saved: list[torch.Tensor], iters: int,
           cuda: bool) -> list[float]:
    dist.barrier()
    times = []
    for _ in range(iters):
        _refill(xs, saved, cuda)  # outside the timed region
        t0 = time.perf_counter()
        _burst(comm, xs, cuda)
        times.append(time.perf_counter() - t0)
    return times


def _memcpy_times(nbytes: int, iters: int, device: torch.device) -> list[float]:
    """One core copying ``nbytes`` between two buffers: the bandwidth limit of a copy.

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


def _slowest_median(times: list[float], device: torch.device) -> float:
    """Elementwise MAX over ranks (the slowest rank sets the pace), then the median."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # default group, not the communicator
    return statistics.median(t.cpu().tolist())


def _sweep(fabric: Any, comms: list[Any], bench: BenchSpec) -> dict[str, Any]:
    rank, world, device = fabric.global_rank, fabric.world_size, fabric.device
    dtype = BENCH_DTYPES[bench.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    k = max(bench.many_small, 1)
    cuda = device.type == "cuda"
    comm = comms[0]

    rows: list[dict[str, Any]] = []
    stats: list[dict[str, Any]] = []
    for nbytes in bench_sizes(bench.min_bytes, bench.max_bytes, bench.factor, elem):
        count = nbytes // elem
        saved = [_pattern(rank, j, count).to(device=device, dtype=dtype) for j in range(k)]
        xs = [s.clone() for s in saved]
        for c in comms:
            for _ in range(bench.warmup):
                _refill(xs, saved, cuda)
                _burst(c, xs, cuda)
        comm.reset_stats()
        times: list[list[float]] = [[] for _ in comms]
        for _ in range(bench.rounds):  # interleaved, so drift on a shared host hits both alike
            for i, c in enumerate(comms):
                times[i] += _timed(c, xs, saved, bench.iters, cuda)
        n_iter = bench.iters * bench.rounds
        st = comm.stats.as_dict()
        stats.append({"size": nbytes, **{f"{key}_per_iter": st[key] / n_iter
                                         for key in ("calls", "collectives", "wire_bytes")}})

        # correctness, separate from the timed loop, for every communicator measured
        wrong = 0
        for c in comms:
            _refill(xs, saved, cuda)
            _burst(c, xs, cuda)
            wrong += sum(int((x != _expected(world, j, count).to(device=device, dtype=dtype))
                             .sum().item()) for j, x in enumerate(xs))
        w = torch.tensor([wrong], dtype=torch.int64, device=device)
        dist.all_reduce(w, op=dist.ReduceOp.MAX)
        med = _slowest_median(times[0], device)
        algbw = nbytes * k / med / 1e9 if med > 0 else float("nan")
        row = {
            "size": nbytes,
            "count": count,
            "type": bench.dtype,
            "redop": "sum",
            "time_us": round(med * 1e6, 3),
            "algbw_gbps": _sig(algbw),
            "busbw_gbps": _sig(algbw * 2 * (world - 1) / world),
            "wrong": int(w.item()),
        }
        if len(comms) > 1:
            base = _slowest_median(times[1], device)
            row["baseline_time_us"] = round(base * 1e6, 3)
            row["speedup"] = _sig(base / med) if med > 0 else float("nan")
        if bench.memcpy:  # rank 0 alone, the others idle: one core's copy bandwidth
            mem = _memcpy_times(nbytes * k, n_iter, device) if rank == 0 else [0.0] * n_iter
            cp = _slowest_median(mem, device)
            row["memcpy_gbps"] = _sig(nbytes * k / cp / 1e9)
            row["busbw_of_memcpy"] = _sig(row["busbw_gbps"] / row["memcpy_gbps"])
        rows.append(row)
    return {"rows": rows, "comm_stats": stats}


def _sig(x: float) -> float:
    """Six significant digits: far below timing noise, and the CSV and report stay readable."""
    return float(f"{x:.6g}")


# -- the job process -------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """nccl-tests' layout (without the root column)."""
    lines = [f"# {title}",
             "#",
             f"# {'size':>10}  {'count':>12}  {'type':>8}  {'redop':>6}  {'time':>7}  "
             f"{'algbw':>6}  {'busbw':>6}  {'#wrong':>6}",
             f"# {'(B)':>10}  {'(elements)':>12}  {'':>8}  {'':>6}  {'(us)':>7}  "
             f"{'(GB/s)':>6}  {'(GB/s)':>6}  {'':>6}"]
    extra = [(key, head, unit) for key, head, unit in _EXTRA_COLUMNS if rows and key in rows[0]]
    for _, head, unit in extra:
        lines[2] += f"  {head:>9}"
        lines[3] += f"  {unit:>9}"
    for r in rows:
        line = (f"{r['size']:12d}  {r['count']:12d}  {r['type']:>8}  {r['redop']:>6}  "
                f"{_time(r['time_us'])}  {r['algbw_gbps']:6.2f}  {r['busbw_gbps']:6.2f}  "
                f"{r['wrong']:6d}")
        for key, _, _ in extra:
            v = r[key]
            line += f"  {_time(v, 9) if key.endswith('_us') else f'{v:9.3g}'}"
        lines.append(line)
    return "\n".join(lines)


_EXTRA_COLUMNS = [("baseline_time_us", "base time", "(us)"), ("speedup", "speedup", "(x)"),
                  ("memcpy_gbps", "memcpy", "(GB/s)"), ("busbw_of_memcpy", "bus/memcpy", "")]


def _time(t: float, width: int = 7) -> str:
    return f"{t:{width}.0f}" if t >= 10000 else f"{t:{width}.1f}" if t >= 100 else f"{t:{width}.2f}"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path) as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> float:
    def body(out_dir: str, tracker) -> dict[str, Any]:
        csv_path = Path(out_dir) / "bench.csv"
        name, opts = strategy_options_from(cfg)
        bench = BenchSpec(**OmegaConf.to_container(cfg.bench, resolve=True))
        parallel = ParallelSpec(**OmegaConf.to_container(cfg.parallel, resolve=True))
        validate_bench(name, opts, bench, parallel)
        out = launch_ranks(_rank_bench, parallel, name, opts, bench, parallel,
                           bool(cfg.profile), out_dir)
        mode, tensors = mode_name(bench.many_small), bench.many_small
        rows = [{**r, "strategy": name, "world_size": parallel.world_size, "mode": mode,
                 "tensors": tensors, "baseline": bench.baseline or ""} for r in out["rows"]]
        backend = resolve_backend(parallel)
        title = (f"all_reduce  strategy: {name}  world_size: {parallel.world_size}  "
                 f"backend: {backend}  dtype: {bench.dtype}  mode: {mode}  "
                 f"iters: {bench.iters}  warmup: {bench.warmup}")
        if bench.baseline:
            title += (f"\n# baseline: {bench.baseline} (same run, {bench.rounds} interleaved "
                      f"rounds; speedup = baseline time / time)")
        print(format_table(rows, title), flush=True)
        write_csv(csv_path, rows)
        tracker.log_table("allreduce", rows)
        tracker.attach(csv_path)
        for png in plot_bench(rows, Path(out_dir)):
            tracker.attach(png)
        largest = rows[-1]
        wrong = sum(r["wrong"] for r in rows)
        print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}", flush=True)
        return {
            "status": "ok",
            "strategy": name,
            "options": opts,
            "world_size": parallel.world_size,
            "backend": backend,
            "dtype": bench.dtype,
            "mode": mode,
            "bench": asdict(bench),
            "wrong_total": wrong,
            "objective": "busbw_gbps of the largest size",
            "busbw_gbps": largest["busbw_gbps"],
            "time_us": largest["time_us"],
            "size_results": rows,
            "comm_stats": out["comm_stats"],
        }

    return run_job(cfg, "bench", body, "results.json")["busbw_gbps"]


if __name__ == "__main__":
    main()
