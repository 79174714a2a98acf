"""Measure the CPU-host performance targets and write the committed results file.

``python -m experiments.targets [--repeats 3] [--out results/cpu_targets]``

Every target is a ratio measured inside one run of the real entry point (``experiments.bench``
with ``bench.baseline``, so both sides share the run and its noise; ``experiments.infer`` jobs
for the TP runner, run back to back and interleaved). Each measurement is repeated
``--repeats`` times and the median is reported, next to the target and whether it was met.
The output (``.json`` and ``.md``) records the machine and the exact commands, so a later
change can be compared against it. A target that is not met is reported as not met.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments.common import child_env

ROOT = Path(__file__).resolve().parents[1]
BENCH = ["logger=none", "bench.rounds=5", "bench.iters=20", "bench.warmup=5"]
INFER = [
    "logger=none",
    "progress=false",
    "model=small",
    "parallel.world_size=2",
    "workload.new_tokens=32",
]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _run(module: str, overrides: list[str], work: Path) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(dir=work))
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={out}"]
    env = child_env()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text())


def _bench_runs(args: list[str], repeats: int, work: Path) -> list[dict[str, Any]]:
    """``repeats`` runs of ``experiments.bench`` with ``args``, one after another."""
    return [_run("experiments.bench", args, work) for _ in range(repeats)]


def _median_rows(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    sizes = [r["size"] for r in runs[0]["size_results"]]
    return {
        s: statistics.median(run["size_results"][i][key] for run in runs)
        for i, s in enumerate(sizes)
    }


def bench_targets(repeats: int, work: Path) -> list[dict[str, Any]]:
    out = []

    def bench(args: list[str]) -> list[dict[str, Any]]:
        return _bench_runs([*args, *BENCH], repeats, work)

    for ws, need in ((2, 20.0), (4, 5.0)):
        args = [
            "strategy=shm",
            "bench.baseline=naive",
            f"parallel.world_size={ws}",
            "bench.min_bytes=4096",
            "bench.max_bytes=65536",
            "bench.factor=4",
        ]
        sp = _median_rows(bench(args), "speedup")
        for size, v in sp.items():
            out.append(
                _target(
                    f"shm vs naive, {size // 1024} KiB, world size {ws}",
                    "speedup (x)",
                    v,
                    need,
                    args,
                )
            )
    args = [
        "strategy=shm",
        "bench.baseline=naive",
        "bench.min_bytes=16777216",
        "bench.max_bytes=16777216",
        "bench.memcpy=true",
        "bench.iters=5",
    ]
    runs = bench(args)
    size = 16 << 20
    out.append(
        _target(
            "shm vs naive, 16 MiB, world size 2",
            "speedup (x)",
            _median_rows(runs, "speedup")[size],
            2.0,
            args,
        )
    )
    out.append(
        _target(
            "shm busbw / single-core memcpy bandwidth, 16 MiB",
            "fraction",
            _median_rows(runs, "busbw_of_memcpy")[size],
            0.40,
            args,
            detail=f"busbw {_median_rows(runs, 'busbw_gbps')[size]:.2f} GB/s, "
            f"memcpy {_median_rows(runs, 'memcpy_gbps')[size]:.2f} GB/s",
        )
    )
    args = [
        "strategy=naive",
        "bench.baseline=raw",
        "bench.min_bytes=4096",
        "bench.max_bytes=4096",
        "bench.iters=50",
        "bench.rounds=10",
    ]
    runs = bench(args)
    overhead = 1.0 / _median_rows(runs, "speedup")[4096] - 1.0
    out.append(
        _target(
            "naive over raw torch.distributed.all_reduce, 4 KiB",
            "overhead",
            overhead,
            0.05,
            args,
            lower_is_better=True,
        )
    )
    args = [
        "strategy=bucketed",
        "bench.baseline=naive",
        "bench.many_small=64",
        "bench.min_bytes=1024",
        "bench.max_bytes=1024",
    ]
    out.append(
        _target(
            "bucketed vs naive, 64 x 1 KiB issued before any wait",
            "speedup (x)",
            _median_rows(bench(args), "speedup")[1024],
            10.0,
            args,
        )
    )
    return out


def infer_targets(repeats: int, work: Path) -> list[dict[str, Any]]:
    configs = {
        "naive": ["strategy=naive"],
        "shm": ["strategy=shm"],
        "async_overlap/naive": ["strategy=async_overlap", "strategy.inner=naive"],
        "double_buffer/naive": ["strategy=double_buffer", "strategy.inner=naive"],
        "async_overlap/shm": ["strategy=async_overlap", "strategy.inner=shm"],
        "double_buffer/shm": ["strategy=double_buffer", "strategy.inner=shm"],
        "bucketed/shm": ["strategy=bucketed", "strategy.inner=shm"],
    }
    res: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(repeats):  # interleaved: drift on a shared host hits every config alike
        for mb in (1, 2):
            for name, args in configs.items():
                r = _run("experiments.infer", [*args, *INFER, f"workload.micro_batches={mb}"], work)
                res.setdefault((name, mb), []).append(r)

    def med(name: str, mb: int, key: str) -> float:
        return statistics.median(r[key] for r in res[(name, mb)])

    out = []
    for sched in ("async_overlap", "double_buffer"):
        for inner in ("naive", "shm"):
            base, it = med(inner, 2, "exposed_comm_s"), med(f"{sched}/{inner}", 2, "exposed_comm_s")
            tps_b, tps = (
                med(inner, 2, "decode_tokens_per_s"),
                med(f"{sched}/{inner}", 2, "decode_tokens_per_s"),
            )
            out.append(
                _target(
                    f"{sched} (inner {inner}) vs {inner}: exposed comm cut, small, TP 2, mb 2",
                    "fraction cut",
                    1 - it / base,
                    0.40,
                    [*configs[f"{sched}/{inner}"], *INFER, "workload.micro_batches=2"],
                    detail=f"exposed {base:.3f} s -> {it:.3f} s; decode tok/s {tps_b:.1f} -> "
                    f"{tps:.1f} ({'not lower' if tps >= tps_b else 'LOWER'})",
                )
            )
    for mb in (1, 2):
        naive = med("naive", mb, "decode_tokens_per_s")
        best = max(
            (n for n in configs if n != "naive"), key=lambda n: med(n, mb, "decode_tokens_per_s")
        )
        out.append(
            _target(
                f"best strategy ({best}) vs naive over gloo: decode tok/s, small, TP 2, mb {mb}",
                "speedup (x)",
                med(best, mb, "decode_tokens_per_s") / naive,
                3.0,
                [*configs[best], *INFER, f"workload.micro_batches={mb}"],
                detail=f"naive {naive:.1f} tok/s (exposed {med('naive', mb, 'exposed_comm_s'):.2f}"
                f" s), {best} {med(best, mb, 'decode_tokens_per_s'):.1f} tok/s (exposed "
                f"{med(best, mb, 'exposed_comm_s'):.2f} s); decode time without any "
                f"exposed comm bounds the speedup at "
                f"{_bound(res[('naive', mb)]):.2f}x",
            )
        )
    out.append(
        {
            "table": {
                f"{n} mb{mb}": {
                    k: round(med(n, mb, k), 4)
                    for k in (
                        "decode_tokens_per_s",
                        "itl_p50_s",
                        "exposed_comm_s",
                        "exposed_comm_share",
                    )
                }
                for (n, mb) in res
            }
        }
    )
    return out


# -- issue 25: shm in native code, against the host's own limits ------------------------------
NATIVE_BENCH = [
    "strategy=shm",
    "strategy.impl=native",
    "bench.baseline=naive",
    'bench.compare=["shm:impl=python"]',
    "parallel.world_size=2",
    "logger=none",
    "bench.rounds=5",
    "bench.iters=40",
    "bench.warmup=10",
]


def _decode_rates(
    fabric: Any, preset: str, batch: int, new_tokens: int, rounds: int
) -> dict[str, list[float]]:
    """Decode tokens/s of the same TP model over each communicator, interleaved per round; the
    slowest rank's time. ``none`` communicates nothing (the compute alone)."""
    import torch.distributed as dist

    from framework import build_communicator
    from framework.model import TPLlama, get_config
    from framework.model.generate import generate
    from framework.run.measure import NoComm

    torch.set_num_threads(1)
    cfg = get_config(preset)
    prompts = [[(7 * i + j) % cfg.vocab_size for j in range(8)] for i in range(batch)]
    comms: dict[str, Any] = {
        "none": NoComm(),
        "shm": build_communicator("shm", impl="native"),
        "shm:impl=python": build_communicator("shm", impl="python"),
        "naive": build_communicator("naive"),
    }
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        models = {n: TPLlama(cfg, c, rank, world).init_random(seed=0) for n, c in comms.items()}
        rates: dict[str, list[float]] = {n: [] for n in comms}
        for _ in range(rounds):
            for name, model in models.items():
                generate(model, prompts, 2)  # warm-up
                dist.barrier()
                t0 = time.perf_counter()
                generate(model, prompts, new_tokens)
                took = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                rates[name].append(batch * new_tokens / took.item())
        return rates
    finally:
        for c in comms.values():
            c.close()


def _decode(preset: str, cpu_bind: str, load: int, rounds: int = 10) -> dict[str, float]:
    from framework.run.launch import launch_ranks
    from framework.run.measure import background_load
    from framework.run.spec import ParallelSpec

    parallel = ParallelSpec(world_size=2, backend="gloo", device="cpu", cpu_bind=cpu_bind)
    with background_load(load):
        rates = launch_ranks(_decode_rates, parallel, preset, 4, 64, rounds)
    return {n: statistics.median(r) for n, r in rates.items()}


def native_targets(repeats: int, work: Path, cpu_bind: str) -> list[dict[str, Any]]:
    """Issue 25's targets for shm's native path, each a ratio inside one run."""
    bind = [f"parallel.cpu_bind={cpu_bind}"]
    out = []
    small = [
        *NATIVE_BENCH,
        *bind,
        "bench.min_bytes=1024",
        "bench.max_bytes=262144",
        "bench.factor=2",
    ]
    runs = _bench_runs(small, repeats, work)
    t, p90 = _median_rows(runs, "time_us"), _median_rows(runs, "p90_us")
    rt, lim = _median_rows(runs, "round_trip_us"), _median_rows(runs, "limit_us")
    sp = _median_rows(runs, "speedup")
    py = {
        s: statistics.median(r["size_results"][i]["times_us"]["shm:impl=python"] for r in runs)
        for i, s in enumerate(t)
    }
    out.append(
        _target(
            "native shm, 4 KiB, world size 2: time per call (whole communicator path)",
            "us",
            t[4096],
            3.0,
            small,
            lower_is_better=True,
            detail=f"{t[4096] / rt[4096]:.1f}x the round trip ({rt[4096]:.2f} us), "
            f"{t[4096] / lim[4096]:.1f}x round trip + copy ({lim[4096]:.2f} us); "
            f"Python path {py[4096]:.2f} us",
        )
    )
    out.append(
        _target("native shm vs naive, 4 KiB, world size 2", "speedup (x)", sp[4096], 150.0, small)
    )
    sizes = sorted(t)
    ratio = max(max(t[a], t[b]) / min(t[a], t[b]) for a, b in itertools.pairwise(sizes))
    out.append(
        _target(
            "native shm 1-256 KiB: largest median ratio between neighbouring sizes",
            "ratio",
            ratio,
            1.5,
            small,
            lower_is_better=True,
            detail="medians (us): " + ", ".join(f"{s // 1024}K {t[s]:.1f}" for s in sizes),
        )
    )
    worst = max(sizes, key=lambda s: p90[s] / t[s])
    out.append(
        _target(
            "native shm 1-256 KiB: largest p90 / median",
            "ratio",
            p90[worst] / t[worst],
            3.0,
            small,
            lower_is_better=True,
            detail=f"at {worst // 1024} KiB",
        )
    )
    big = [
        *NATIVE_BENCH,
        *bind,
        "bench.min_bytes=16777216",
        "bench.max_bytes=16777216",
        "bench.iters=5",
    ]
    runs = _bench_runs(big, repeats, work)
    size = 16 << 20
    out.append(
        _target(
            "native shm busbw / one core's copy bandwidth, 16 MiB, world size 2",
            "fraction",
            _median_rows(runs, "busbw_of_memcpy")[size],
            0.5,
            big,
            detail=f"busbw {_median_rows(runs, 'busbw_gbps')[size]:.2f} GB/s, copy "
            f"{_median_rows(runs, 'memcpy_gbps')[size]:.2f} GB/s",
        )
    )
    quiet = _decode("tiny", cpu_bind, 0)
    cmd = "python -m experiments.targets --only native  # tiny, TP 2, 4 x 64 tokens, 10 rounds"
    out.append(
        _target(
            "native shm vs no communication: decode tok/s, tiny, TP 2",
            "fraction",
            quiet["shm"] / quiet["none"],
            0.95,
            [],
            command=cmd,
            detail=", ".join(f"{n} {v:.0f} tok/s" for n, v in quiet.items()),
        )
    )
    loaded = [
        *small[:-3],
        "bench.min_bytes=4096",
        "bench.max_bytes=4096",
        "bench.background_load=1",
    ]
    run = _run("experiments.bench", loaded, work)["size_results"][0]
    nat, pyt = run["times_us"]["shm"], run["times_us"]["shm:impl=python"]
    out.append(
        _target(
            "one busy background process: native / Python shm time, 4 KiB",
            "ratio",
            nat / pyt,
            1.0,
            loaded,
            lower_is_better=True,
            detail=f"native {nat:.1f} us, Python {pyt:.1f} us",
        )
    )
    busy = _decode("small", cpu_bind, 1, rounds=4)
    out.append(
        _target(
            "one busy background process: native / Python shm decode tok/s, small, TP 2",
            "ratio",
            busy["shm"] / busy["shm:impl=python"],
            1.0,
            [],
            command="python -m experiments.targets --only native  # small, 1 busy process",
            detail=", ".join(f"{n} {v:.1f} tok/s" for n, v in busy.items()),
        )
    )
    return out


def _bound(runs: list[dict[str, Any]]) -> float:
    """Speedup over these naive runs if communication cost nothing: decode / (decode - comm)."""
    r = statistics.median(x["exposed_comm_share"] for x in runs)
    return 1 / (1 - r)


def _target(
    what: str,
    unit: str,
    value: float,
    need: float,
    args: list[str],
    *,
    lower_is_better: bool = False,
    detail: str = "",
    command: str = "",
) -> dict[str, Any]:
    met = value <= need if lower_is_better else value >= need
    module = "infer" if any(a.startswith("model=") for a in args) else "bench"
    command = command or f"python -m experiments.{module} {' '.join(args)}"
    return {
        "target": what,
        "unit": unit,
        "measured": round(value, 4),
        "required": f"{'<=' if lower_is_better else '>='} {need}",
        "met": met,
        "detail": detail,
        "command": command,
    }


def to_markdown(data: dict[str, Any]) -> str:
    lines = ["# CPU-host performance targets (issues 5 and 25)", ""]
    for section, m in data["machines"].items():
        lines += [
            f"Machine ({section} targets): {m['cpu']}, {m['cores']} cores, {m['memory']}; "
            f"{m['os']}; Python {m['python']}, torch {m['torch']}; measured {m['date']}.",
            "",
        ]
    lines += [
        f"Each value is the median of {data['repeats']} runs; each bench ratio is measured"
        " inside one run (strategy and baseline interleaved). Regenerate with "
        "`python -m experiments.targets`.",
        "",
        "| target | measured | required | met | detail |",
        "|---|---|---|---|---|",
    ]
    table = None
    for t in data["targets"]:
        if "table" in t:
            table = t["table"]
            continue
        lines.append(
            f"| {t['target']} | {t['measured']:.3g} {t['unit']} | {t['required']} | "
            f"{'yes' if t['met'] else '**no**'} | {t['detail']} |"
        )
    if data.get("analysis"):
        lines += ["", "## What limits the targets not met", ""]
        lines += [f"- {a}" for a in data["analysis"]]
    lines += ["", "Commands:", ""]
    lines += [
        f"- `{c}`" for c in dict.fromkeys(t["command"] for t in data["targets"] if "command" in t)
    ]
    if table:
        lines += [
            "",
            "TP runner, small preset, TP 2, 32 new tokens (medians):",
            "",
            "| config | decode tok/s | ITL p50 (s) | exposed comm (s) | share |",
            "|---|---|---|---|---|",
        ]
        for k, v in table.items():
            lines.append(
                f"| {k} | {v['decode_tokens_per_s']:.1f} | {v['itl_p50_s']:.4f} | "
                f"{v['exposed_comm_s']:.3f} | {v['exposed_comm_share']:.3f} |"
            )
    return "\n".join(lines) + "\n"


SECTIONS = {"bench": bench_targets, "infer": infer_targets, "native": native_targets}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/cpu_targets")
    ap.add_argument("--only", choices=list(SECTIONS), default=None)
    ap.add_argument("--cpu-bind", default="none", help="parallel.cpu_bind of the native runs")
    a = ap.parse_args(argv)
    out = Path(a.out)
    old = (
        json.loads(out.with_suffix(".json").read_text())
        if out.with_suffix(".json").exists()
        else {}
    )
    with tempfile.TemporaryDirectory(prefix="commlab-targets-") as tmp:
        work = Path(tmp)
        targets = []
        for section in SECTIONS if a.only is None else [a.only]:
            if section == "native":
                got = native_targets(a.repeats, work, a.cpu_bind)
            else:
                got = SECTIONS[section](a.repeats, work)
            targets += [{**t, "section": section} for t in got]
    ran = {t["section"] for t in targets}  # the other sections' figures are kept as they were
    kept = [t for t in old.get("targets", []) if t.get("section", "issue 5") not in ran]
    # the host each section was measured on (the sections not run keep theirs)
    machines = old.get("machines") or ({"issue 5": old["machine"]} if "machine" in old else {})
    machines.update({section: machine() for section in ran})
    data = {**old, "machines": machines, "repeats": a.repeats, "targets": kept + targets}
    data.pop("machine", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
