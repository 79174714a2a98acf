"""nccl-tests-style benchmark of a strategy: ``python -m experiments.bench [overrides]``.

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

``bench.op`` picks the collective: ``all_reduce`` (default), ``reduce_scatter`` or
``all_gather``. As in nccl-tests, ``size`` is the whole buffer: the all-reduce's, the
reduce-scatter's input, the all-gather's output (each rank contributes size / n; sizes are
rounded down to a multiple of n elements).

``algbw`` = size / time (with many_small, K * size: the whole burst), ``busbw`` = algbw times
nccl-tests' factor for the op: 2(n-1)/n for all-reduce, (n-1)/n for reduce-scatter and
all-gather (0 for n = 1); GB/s = 1e9 B/s.
``#wrong`` is a separate correctness check after the timed loop: every rank fills its input with
small integers from a seed (:mod:`framework.run.inputs`, exact in every dtype up to 32 ranks),
runs one more all-reduce (burst) and counts the elements that differ from the sum it computes
itself from every rank's input (max over ranks). The loop is :func:`framework.run.measure.sweep`.

The job process prints the table, writes ``bench.csv`` (the columns of :data:`CSV_COLUMNS`) and
``results.json`` (``size_results`` = the rows) in the run directory, logs the rows as a W&B
table and attaches ``bench.csv``. The returned objective (what a Hydra sweeper optimises) is
the busbw in GB/s of the largest size (median-time based, as in the table; 0 for one rank).

``bench.compare=[tree,shm,"auto:table=this_host"]`` times more strategies in the same run,
interleaved with the strategy in every round (``bench.rounds``), and prints every one's time
per size (``times_us`` in the CSV rows' JSON). ``bench.tune=NAME`` writes the fastest of the
compared algorithms per size bucket into the user's table ``NAME.json`` (``$COMMLAB_TABLES``,
else ``~/.local/share/commlab/tables``: :mod:`framework.comm.tuning`; without ``compare``:
every exact algorithm the backend runs), the table ``strategy=auto strategy.table=NAME``
dispatches by; rows of other (op, world size, dtype) already in the file are kept.
"""

from __future__ import annotations

import csv
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import experiments.configs  # noqa: F401  (registers the structured configs)
from experiments.common import run_job, strategy_options_from
from experiments.configs import BenchSpec
from experiments.report import plot_bench
from framework.comm.files import atomic_open
from framework.comm.fused import FUSED_OPS
from framework.comm.profiling import profiled
from framework.comm.registry import (
    available_strategies,
    build_communicator,
    exact_algorithms,
    get_strategy,
    strategy_label,
    strategy_options,
)
from framework.comm.tuning import bucket_of, merge_rows
from framework.run.fused_timing import fused_sweep
from framework.run.launch import launch_ranks
from framework.run.measure import RawAllReduce, SweepSpec, background_load, bench_sizes, sweep
from framework.run.spec import (
    ConfigError,
    ParallelSpec,
    parallel_problems,
    parse_strategy,
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
CSV_COLUMNS = [
    "size",
    "count",
    "type",
    "redop",
    "time_us",
    "p90_us",
    "algbw_gbps",
    "busbw_gbps",
    "wrong",
    "strategy",
    "op",
    "world_size",
    "mode",
    "tensors",
    "baseline",
    "baseline_time_us",
    "speedup",
    "memcpy_gbps",
    "busbw_of_memcpy",
    "round_trip_us",
    "limit_us",
    "of_limit",
]


# -- configuration -------------------------------------------------------------------------
def validate_bench(
    name: str, opts: dict[str, Any], bench: BenchSpec, parallel: ParallelSpec
) -> None:
    """Raise ConfigError listing every problem, before any rank is spawned."""
    problems: list[str] = []
    b = bench
    if b.min_bytes <= 0:
        problems.append(f"bench.min_bytes must be > 0, got {b.min_bytes}")
    if b.max_bytes < b.min_bytes:
        problems.append(
            f"bench.max_bytes must be >= bench.min_bytes ({b.min_bytes}), got {b.max_bytes}"
        )
    if not isinstance(b.factor, int) or isinstance(b.factor, bool) or b.factor < 2:
        problems.append(
            f"bench.factor must be an integer >= 2 (sizes are multiplied by it), got {b.factor!r}"
        )
    if b.warmup < 0:
        problems.append(f"bench.warmup must be >= 0, got {b.warmup}")
    if b.iters < 1:
        problems.append(f"bench.iters must be >= 1, got {b.iters}")
    if b.many_small < 0:
        problems.append(
            f"bench.many_small must be >= 0 (0: one tensor per iteration), got {b.many_small}"
        )
    if b.dtype not in BENCH_DTYPES:
        problems.append(f"bench.dtype must be one of {list(BENCH_DTYPES)}, got {b.dtype!r}")
    ops = ("all_reduce", "reduce_scatter", "all_gather", *FUSED_OPS)
    if b.op not in ops:
        problems.append(f"bench.op must be one of {list(ops)}, got {b.op!r}")
    elif b.op in FUSED_OPS:
        if b.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"bench.op={b.op} needs a floating-point bench.dtype, got {b.dtype}")
        if b.hidden < 1:
            problems.append(f"bench.hidden must be >= 1, got {b.hidden}")
        if b.many_small or b.tune or b.memcpy:
            problems.append(
                f"bench.op={b.op} times one call per iteration against its composition: "
                f"many_small, memcpy and tune do not apply"
            )
    if b.rounds < 1:
        problems.append(f"bench.rounds must be >= 1, got {b.rounds}")
    if b.background_load < 0:
        problems.append(f"bench.background_load must be >= 0, got {b.background_load}")
    if b.baseline is not None and b.baseline != "raw":
        problems += strategy_problems(*parse_strategy(b.baseline))
    for label in compared(b, resolve_backend(parallel)):
        problems += strategy_problems(*parse_strategy(label))
    if b.tune and any(":" in label for label in b.compare or ()):
        problems.append("bench.tune: compare plain algorithm names (auto builds them by name)")
    problems += parallel_problems(parallel) + strategy_problems(name, opts)
    dtype = BENCH_DTYPES.get(b.dtype)
    if name in available_strategies() and dtype is not None:
        supported = get_strategy(name).supported_dtypes
        if dtype not in supported:
            ok = sorted(str(t).removeprefix("torch.") for t in supported)
            problems.append(
                f"strategy {name!r} does not support bench.dtype={b.dtype}; it supports {ok}"
            )
    if problems:
        raise ConfigError("invalid bench configuration:\n  - " + "\n  - ".join(problems))


def compared(bench: BenchSpec, backend: str) -> list[str]:
    """The strategies timed beside the job's own: ``bench.compare``, or for ``bench.tune``
    without it every exact algorithm the backend runs (``auto``'s default candidates)."""
    if bench.compare:
        return list(bench.compare)
    if bench.tune:
        return exact_algorithms(backend)
    return []


def tuning_rows(rows: list[dict[str, Any]], candidates: list[str], world: int, op: str):
    """The fastest candidate per size, keyed as ``auto`` looks it up (each rank's input)."""
    out = []
    for r in rows:
        times = {c: r["times_us"][c] for c in candidates}
        best = min(times, key=times.get)
        per_rank = r["size"] // world if op == "all_gather" else r["size"]
        out.append(
            {
                "op": op,
                "world_size": world,
                "dtype": r["type"],
                "bucket_bytes": bucket_of(per_rank),
                "algorithm": best,
                "time_us": times[best],
                "times_us": times,
            }
        )
    return out


def format_compare(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """Every compared strategy's median time per size, and the fastest."""
    head = f"# {'size':>10}  " + "  ".join(f"{lb[:14]:>14}" for lb in labels) + "  fastest"
    lines = ["# compared in the same run (median us, slowest rank):", head]
    for r in rows:
        t = r["times_us"]
        cells = "  ".join(f"{t[lb]:14.1f}" for lb in labels)
        lines.append(f"  {r['size']:10d}  {cells}  {min(t, key=t.get)}")
    return "\n".join(lines)


def mode_name(many_small: int) -> str:
    return f"many_small:{many_small}" if many_small > 0 else "single"


def sweep_spec(bench: BenchSpec) -> SweepSpec:
    """The timing loop's spec for a validated bench config."""
    dtype = BENCH_DTYPES[bench.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    return SweepSpec(
        sizes=tuple(bench_sizes(bench.min_bytes, bench.max_bytes, bench.factor, elem)),
        dtype=dtype,
        warmup=bench.warmup,
        iters=bench.iters,
        many_small=bench.many_small,
        rounds=bench.rounds,
        memcpy=bench.memcpy,
        limits=bench.limits,
        op=bench.op,
    )


# -- on every rank ---------------------------------------------------------------------------
def _build(name: str, opts: dict[str, Any], parallel: ParallelSpec) -> Any:
    if name == "raw":
        return RawAllReduce(parallel.timeout_s)
    opts = dict(opts)
    opts.setdefault("timeout_s", parallel.timeout_s)
    return build_communicator(name, **opts)


def _label(name: str, opts: dict[str, Any]) -> str:
    """``name:key=value`` with the options that differ from the strategy's defaults."""
    defaults = strategy_options(name)
    changed = {k: v for k, v in opts.items() if k in defaults and v != defaults[k]}
    changed.pop("timeout_s", None)
    return strategy_label(name, changed)


def _rank_bench(
    fabric: Any,
    name: str,
    opts: dict[str, Any],
    bench: BenchSpec,
    parallel: ParallelSpec,
    profile: bool = False,
    out_dir: str = ".",
) -> dict:
    torch.set_num_threads(parallel.threads_per_rank)
    comms = [_build(name, opts, parallel)]
    labels = [name]
    try:
        if bench.baseline:
            comms.append(_build(*parse_strategy(bench.baseline), parallel))
            labels.append(bench.baseline)
        for label in compared(bench, resolve_backend(parallel)):
            comms.append(_build(*parse_strategy(label), parallel))
            labels.append(label)
        if bench.op in FUSED_OPS:
            spec, rank, world = sweep_spec(bench), fabric.global_rank, fabric.world_size
            labels[0] = _label(name, opts)  # the job's own strategy may be compared to itself
            return fused_sweep(comms, labels, spec, bench.hidden, rank, world)
        with profiled(profile, out_dir, fabric.global_rank, fabric.device.type == "cuda"):
            out = sweep(
                comms,
                sweep_spec(bench),
                fabric.global_rank,
                fabric.world_size,
                fabric.device,
                labels if len(comms) > 1 else None,
                baseline=bool(bench.baseline),
            )
        # what each auto communicator chose per (op, dtype, size bucket)
        out["choices"] = {
            label: {f"{op}/{dt}/{b}": alg for (op, dt, b), (alg, _) in c.choice.items()}
            for label, c in zip(labels, comms, strict=True)
            if hasattr(c, "choice")
        }
        return out
    finally:
        for c in comms:
            c.close()


# -- the job process -------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """nccl-tests' layout (without the root column)."""
    lines = [
        f"# {title}",
        "#",
        f"# {'size':>10}  {'count':>12}  {'type':>8}  {'redop':>6}  {'time':>7}  "
        f"{'algbw':>6}  {'busbw':>6}  {'#wrong':>6}",
        f"# {'(B)':>10}  {'(elements)':>12}  {'':>8}  {'':>6}  {'(us)':>7}  "
        f"{'(GB/s)':>6}  {'(GB/s)':>6}  {'':>6}",
    ]
    extra = [(key, head, unit) for key, head, unit in _EXTRA_COLUMNS if rows and key in rows[0]]
    for _, head, unit in extra:
        lines[2] += f"  {head:>9}"
        lines[3] += f"  {unit:>9}"
    for r in rows:
        line = (
            f"{r['size']:12d}  {r['count']:12d}  {r['type']:>8}  {r['redop']:>6}  "
            f"{_time(r['time_us'])}  {r['algbw_gbps']:6.2f}  {r['busbw_gbps']:6.2f}  "
            f"{r['wrong']:6d}"
        )
        for key, _, _ in extra:
            v = r[key]
            line += f"  {_time(v, 9) if key.endswith('_us') else f'{v:9.3g}'}"
        lines.append(line)
    return "\n".join(lines)


_EXTRA_COLUMNS = [
    ("baseline_time_us", "base time", "(us)"),
    ("speedup", "speedup", "(x)"),
    ("memcpy_gbps", "memcpy", "(GB/s)"),
    ("busbw_of_memcpy", "bus/memcpy", ""),
    ("round_trip_us", "rt", "(us)"),
    ("limit_us", "rt+copy", "(us)"),
    ("of_limit", "x limit", "(x)"),
]


def _time(t: float, width: int = 7) -> str:
    return f"{t:{width}.0f}" if t >= 10000 else f"{t:{width}.1f}" if t >= 100 else f"{t:{width}.2f}"


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] = CSV_COLUMNS) -> None:
    with atomic_open(path) as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


FUSED_CSV_COLUMNS = [
    "size",
    "rows_per_rank",
    "strategy",
    "fused_us",
    "composed_us",
    "comm_us",
    "compute_us",
    "speedup",
    "hidden",
    "max_diff",
    "op",
    "world_size",
    "type",
]


def format_fused(rows: list[dict[str, Any]], title: str) -> str:
    """One line per size and strategy: the four ways (median us), speedup and hidden share."""
    lines = [
        f"# {title}",
        "# speedup = composed / fused; hidden = (composed - fused) / min(comm, compute)",
        f"# {'size':>10}  {'strategy':>14}  {'fused':>9}  {'composed':>9}  {'comm':>9}  "
        f"{'compute':>9}  {'speedup':>7}  {'hidden':>7}  {'max_diff':>8}",
    ]
    for r in rows:
        lines.append(
            f"  {r['size']:10d}  {r['strategy'][:14]:>14}  {_time(r['fused_us'], 9)}  "
            f"{_time(r['composed_us'], 9)}  {_time(r['comm_us'], 9)}  "
            f"{_time(r['compute_us'], 9)}  {r['speedup']:7.3f}  {r['hidden']:7.2f}  "
            f"{r['max_diff']:8.2g}"
        )
    return "\n".join(lines)


def fused_results(
    rows: list[dict[str, Any]],
    name: str,
    opts: dict[str, Any],
    bench: BenchSpec,
    parallel: ParallelSpec,
    csv_path: Path,
    tracker: Any,
) -> dict[str, Any]:
    """Print, write and log a fused op's rows (``bench.op`` in FUSED_OPS)."""
    rows = [
        {**r, "op": bench.op, "world_size": parallel.world_size, "type": bench.dtype} for r in rows
    ]
    title = (
        f"{bench.op} against its composition  strategy: {name}  world_size: "
        f"{parallel.world_size}  dtype: {bench.dtype}  hidden: {bench.hidden}  iters: "
        f"{bench.iters} x {bench.rounds} interleaved rounds  warmup: {bench.warmup}"
    )
    print(format_fused(rows, title), flush=True)
    write_csv(csv_path, rows, FUSED_CSV_COLUMNS)
    tracker.log_table("fused", rows)
    tracker.attach(csv_path)
    mine = [r for r in rows if r["strategy"] == rows[0]["strategy"]]
    return {
        "status": "ok",
        "strategy": name,
        "options": opts,
        "world_size": parallel.world_size,
        "backend": resolve_backend(parallel),
        "op": bench.op,
        "dtype": bench.dtype,
        "bench": asdict(bench),
        "objective": "speedup (composed / fused) of the largest size",
        "speedup": mine[-1]["speedup"],
        "size_results": rows,
    }


@hydra.main(version_base="1.3", config_path="pkg://commlab_conf", config_name="bench")
def main(cfg: DictConfig) -> float:
    def body(out_dir: str, tracker) -> dict[str, Any]:
        csv_path = Path(out_dir) / "bench.csv"
        name, opts = strategy_options_from(cfg)
        bench = OmegaConf.to_object(cfg.bench)  # the structured configs: BenchSpec
        parallel = OmegaConf.to_object(cfg.parallel)  # and ParallelSpec
        validate_bench(name, opts, bench, parallel)
        with background_load(bench.background_load):
            out = launch_ranks(
                _rank_bench, parallel, name, opts, bench, parallel, bool(cfg.profile), out_dir
            )
        if bench.op in FUSED_OPS:
            return fused_results(out["rows"], name, opts, bench, parallel, csv_path, tracker)
        mode, tensors = mode_name(bench.many_small), bench.many_small
        rows = [
            {
                **r,
                "strategy": name,
                "op": bench.op,
                "world_size": parallel.world_size,
                "mode": mode,
                "tensors": tensors,
                "baseline": bench.baseline or "",
            }
            for r in out["rows"]
        ]
        backend = resolve_backend(parallel)
        title = (
            f"{bench.op}  strategy: {name}  world_size: {parallel.world_size}  "
            f"backend: {backend}  dtype: {bench.dtype}  mode: {mode}  "
            f"iters: {bench.iters}  warmup: {bench.warmup}"
        )
        if bench.baseline:
            title += (
                f"\n# baseline: {bench.baseline} (same run, {bench.rounds} interleaved "
                f"rounds; speedup = baseline time / time)"
            )
        if bench.background_load:
            title += f"\n# background load: {bench.background_load} busy process(es) on the host"
        print(format_table(rows, title), flush=True)
        others = compared(bench, backend)
        table_path = None
        if others:
            labels = [name, *([bench.baseline] if bench.baseline else []), *others]
            print(format_compare(rows, labels), flush=True)
        if bench.tune:
            tuned = tuning_rows(rows, others, parallel.world_size, bench.op)
            meta = {"host": platform.node(), "torch": torch.__version__, "backend": backend}
            table_path = str(merge_rows(bench.tune, tuned, meta))
            print(f"# tuning table: {table_path}", flush=True)
        write_csv(csv_path, rows)
        tracker.log_table("allreduce", rows)
        tracker.attach(csv_path)
        largest = rows[-1]
        wrong = sum(r["wrong"] for r in rows)
        print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}", flush=True)
        return {
            "status": "ok",
            "strategy": name,
            "options": opts,
            "world_size": parallel.world_size,
            "backend": backend,
            "op": bench.op,
            "dtype": bench.dtype,
            "mode": mode,
            "bench": asdict(bench),
            "wrong_total": wrong,
            "objective": "busbw_gbps of the largest size",
            "busbw_gbps": largest["busbw_gbps"],
            "time_us": largest["time_us"],
            "size_results": rows,
            "tuning_table": table_path,
            "auto_choices": out.get("choices", {}),
            "comm_stats": out["comm_stats"],
        }

    def plots(out_dir: str, tracker, results: dict[str, Any]) -> None:
        if results["op"] in FUSED_OPS:
            return
        for png in plot_bench(results["size_results"], Path(out_dir)):
            tracker.attach(png)

    out = run_job(cfg, "bench", body, "results.json", after=[plots])
    return out["speedup"] if out["op"] in FUSED_OPS else out["busbw_gbps"]


if __name__ == "__main__":
    main()
