"""The selection study: does ``auto`` pick the fastest algorithm per message, here?

``python -m experiments.selection [--out results/selection] [--runs RUNS_JSON]``

1. Tunes: ``experiments.bench bench.tune=this_host`` at world sizes 2 and 4 writes
   ``this_host.json`` in the user's tables directory (``framework.comm.tuning``; the copy
   that ships with commlab is ``conf/tables/this_host.json``), every exact algorithm, 256 B
   to 16 MiB.
2. Measures again, in a separate run: ``experiments.bench -m experiment=bench_selection`` times
   auto (that table), auto (online), adaptive_threshold and every fixed algorithm in one run per
   world size, interleaved in 3 rounds.
3. End to end: ``experiments.infer -m experiment=selection`` (tiny and small presets, TP 2, 3
   repeats) and the same with ``strategy.table=this_host``.

It writes ``README.md`` (per size: the best fixed algorithm and every contender's time relative
to it; over the whole range; end to end with intervals), ``selection.png`` and ``runs.json``
(``--runs runs.json`` rewrites the report from it, measuring nothing). The goals (auto within 5%
of the best fixed algorithm at every size, ahead of every fixed algorithm over the range, end to
end at least as good as the best fixed strategy) are checked and reported met or not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.common import run_module
from framework.comm.tuning import bucket_of
from framework.run.spread import median_interval, ratio_interval

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "selection"
FIXED = ["naive", "tree", "shm", "oneshot", "twoshot", "hierarchical"]
LIBRARY = [n for n in FIXED if n != "shm"]  # the algorithms built on library collectives
AUTO_TABLE, AUTO_ONLINE = "auto:table=this_host", "auto"
AUTO_LIBRARY = "auto:{candidates: [naive, tree, oneshot, twoshot, hierarchical]}"
CONTENDERS = [AUTO_TABLE, AUTO_ONLINE, AUTO_LIBRARY, "adaptive_threshold"]
SHORT = {AUTO_TABLE: "auto (table)", AUTO_ONLINE: "auto (online)", AUTO_LIBRARY: "auto (no shm)"}
GOAL = 1.05  # auto within 5% of the best fixed algorithm
SIZES = ["bench.min_bytes=256", "bench.max_bytes=16777216", "bench.factor=2"]


JOB_TIMEOUT_S = 3000  # one bench or multirun of the study
ROUNDS = 3  # end to end: every strategy once per round, the rounds one after another


def measure(out: Path) -> dict[str, Any]:
    for ws in (2, 4):
        run_module(
            [
                "experiments.bench",
                "bench.tune=this_host",
                f"parallel.world_size={ws}",
                *SIZES,
                "bench.warmup=3",
                "bench.iters=10",
                "bench.rounds=2",
                "logger=none",
                f"hydra.run.dir={out}/tune/{ws}",
            ],
            JOB_TIMEOUT_S,
        )
    run_module(
        ["experiments.bench", "-m", "experiment=bench_selection", f"hydra.sweep.dir={out}/bench"],
        JOB_TIMEOUT_S,
    )
    bench = [json.loads(f.read_text()) for f in sorted((out / "bench").glob("*/results.json"))]
    return {
        "bench": [
            {"world_size": b["world_size"], "rows": b["size_results"], "choices": b["auto_choices"]}
            for b in bench
            if b.get("status") == "ok"
        ],
        "e2e": measure_e2e(out),
    }


def measure_e2e(out: Path) -> list[dict[str, Any]]:
    """Every strategy as its own job, once per round, rounds one after another: the
    variation between jobs (where the scheduler puts the ranks) is inside the spread, and
    drift over the study hits every strategy alike."""
    for r in range(ROUNDS):
        run_module(
            ["experiments.infer", "-m", "experiment=selection", f"hydra.sweep.dir={out}/e2e/{r}"],
            JOB_TIMEOUT_S,
        )
        run_module(
            [
                "experiments.infer",
                "-m",
                "experiment=selection",
                "strategy=auto",
                "strategy.table=this_host",
                f"hydra.sweep.dir={out}/e2e_table/{r}",
            ],
            JOB_TIMEOUT_S,
        )
    e2e = [json.loads(f.read_text()) for f in sorted(out.glob("e2e*/*/*/results.json"))]
    return [_e2e_row(r) for r in e2e if r.get("status") == "ok"]


def _e2e_row(r: dict[str, Any]) -> dict[str, Any]:
    table = (r.get("strategy_options") or {}).get("table")
    return {
        "model": r["model"],
        "strategy": AUTO_TABLE if table else r["strategy"],
        "spread": {k: r["spread"][k] for k in ("decode_tokens_per_s", "ttft_s")},
        "choices": {k: v for k, v in (r.get("comm_extra") or {}).items() if k.startswith("auto_")},
    }


def _versus(r: dict[str, Any], name: str, best: str) -> tuple[float, float, float]:
    """``name``'s time over ``best``'s at one size: (median ratio, lo, hi) from their
    intervals over the iterations."""
    t, sp = r["times_us"], r["spread_us"]
    return t[name] / t[best], sp[name][0] / sp[best][1], sp[name][1] / sp[best][0]


def _verdict(ratio: float, lo: float) -> str:
    return "met" if ratio <= GOAL else "within noise" if lo <= GOAL else "missed"


def size_table(b: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Markdown rows per size and the goals' outcome at one world size."""
    ws, rows = b["world_size"], b["rows"]
    autos = [AUTO_TABLE, AUTO_ONLINE, AUTO_LIBRARY]
    lines = [
        f"### World size {ws}",
        "",
        "| size | best fixed (us) | "
        + " | ".join(f"{SHORT[c]} / best: ratio [interval] pick" for c in autos)
        + " | best library (us) | adaptive_threshold / best |",
        "|---|---|" + "---|" * len(autos) + "---|---|",
    ]
    verdicts: dict[str, list[str]] = {c: [] for c in autos}
    totals = {name: 0.0 for name in FIXED + CONTENDERS}
    for r in rows:
        t = r["times_us"]
        best = min(FIXED, key=lambda n: t[n])
        lib = min(LIBRARY, key=lambda n: t[n])
        for name in totals:
            totals[name] += t[name]
        cells = []
        for c in autos:
            ratio, lo, hi = _versus(r, c, lib if c == AUTO_LIBRARY else best)
            verdicts[c].append(_verdict(ratio, lo))
            pick = b["choices"].get(c, {}).get(f"all_reduce/{r['type']}/{bucket_of(r['size'])}")
            cells.append(f"{ratio:.2f} [{lo:.2f}, {hi:.2f}] {pick}")
        lines.append(
            f"| {r['size']} | {best} {t[best]:.1f} | "
            + " | ".join(cells)
            + f" | {lib} {t[lib]:.1f} | {t['adaptive_threshold'] / t[best]:.2f} |"
        )
    best_total = min(FIXED, key=totals.get)
    lib_total = min(LIBRARY, key=totals.get)
    outcome = {
        "sizes": len(rows),
        "within_5pct": {
            SHORT[c]: {v: verdicts[c].count(v) for v in ("met", "within noise", "missed")}
            for c in autos
        },
        "ahead_of_every_fixed_over_range": {
            SHORT[c]: all(totals[c] < totals[f] for f in (LIBRARY if c == AUTO_LIBRARY else FIXED))
            for c in autos
        },
        "sum_us": {SHORT.get(n, n): round(totals[n]) for n in totals},
        "best_fixed_over_range": best_total,
        "best_library_over_range": lib_total,
    }
    lines += [
        "",
        "Sum of the median times over all sizes (us): "
        + ", ".join(f"{SHORT.get(n, n)} {totals[n]:.0f}" for n in FIXED + CONTENDERS)
        + f". Best fixed over the range: {best_total}; best library-based: {lib_total}.",
        "",
    ]
    return lines, outcome


def _over_jobs(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A metric over a strategy's jobs: the median of the job medians, with their interval."""
    return median_interval([r["spread"][key]["median"] for r in rows])


def e2e_table(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines = [
        "| model | strategy | jobs | decode tok/s (median [interval] over jobs) | each job's "
        "median | TTFT ms | vs best fixed decode (ratio [interval]) | auto's choices "
        "(calls, all jobs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    outcome = {}
    for model in sorted({r["model"] for r in rows}):
        jobs: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["model"] == model:
                jobs.setdefault(r["strategy"], []).append(r)
        fixed = [n for n in FIXED if n in jobs]
        if not fixed:
            continue
        decode = {n: _over_jobs(js, "decode_tokens_per_s") for n, js in jobs.items()}
        best = max(fixed, key=lambda n: decode[n]["median"])
        b = decode[best]
        for name in fixed + [c for c in CONTENDERS if c in jobs]:
            d, t = decode[name], _over_jobs(jobs[name], "ttft_s")
            ratio, lo, hi = ratio_interval(d, b)
            served: dict[str, float] = {}
            for job in jobs[name]:
                for k, v in job["choices"].items():
                    served[k] = served.get(k, 0) + v
            choices = ", ".join(
                f"{k.removeprefix('auto_').removesuffix('_calls')} {v:.0f}"
                for k, v in served.items()
            )
            each = ", ".join(f"{x:.0f}" for x in d["runs"])
            lines.append(
                f"| {model} | {name}{' (best fixed)' if name == best else ''} | "
                f"{len(jobs[name])} | {d['median']:.0f} [{d['lo']:.0f}, {d['hi']:.0f}] | {each} | "
                f"{t['median'] * 1e3:.1f} [{t['lo'] * 1e3:.1f}, {t['hi'] * 1e3:.1f}] | "
                f"{ratio:.2f} [{lo:.2f}, {hi:.2f}] | {choices} |"
            )
            if name in (AUTO_TABLE, AUTO_ONLINE):
                outcome[f"{model} {name}"] = {
                    "ratio": ratio,
                    "at_least_as_good": hi >= 1.0,  # the best fixed is inside its interval
                }
    return lines, outcome


def summary(outcomes: dict[str, Any]) -> list[str]:
    """The goals in sentences, from the outcome numbers."""
    lines = []
    for key, o in outcomes.items():
        if key == "e2e":
            for run, e in o.items():
                ok = "at least as good within the interval" if e["at_least_as_good"] else "worse"
                lines.append(
                    f"- end to end, {run}: decode at {e['ratio']:.2f}x the best fixed "
                    f"strategy ({ok})"
                )
            continue
        for name, v in o["within_5pct"].items():
            ahead = o["ahead_of_every_fixed_over_range"][name]
            lines.append(
                f"- {key}, {name}: within 5% of the best at {v['met']} of {o['sizes']} sizes, "
                f"within noise of it at {v['within noise']}, missed at {v['missed']}; over the "
                f"whole range {'ahead of' if ahead else 'not ahead of'} every fixed algorithm"
            )
    return lines


def plot(runs: dict[str, Any], out: Path) -> None:
    from experiments.report import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs["bench"]), figsize=(6 * len(runs["bench"]), 4))
    for ax, b in zip(axes if len(runs["bench"]) > 1 else [axes], runs["bench"], strict=True):
        sizes = [r["size"] for r in b["rows"]]
        best = [min(r["times_us"][n] for n in FIXED) for r in b["rows"]]
        for name in FIXED + CONTENDERS:
            if name == AUTO_LIBRARY:
                continue
            ax.plot(
                sizes,
                [r["times_us"][name] / m for r, m in zip(b["rows"], best, strict=True)],
                marker="o" if name.startswith("auto") else ".",
                lw=2.5 if name.startswith("auto") else 1,
                label=SHORT.get(name, name),
            )
        ax.axhline(1.05, color="k", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("time / best fixed algorithm")
        ax.set_title(f"all-reduce, world size {b['world_size']}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    save_png(fig, out / "selection.png")


def write(runs: dict[str, Any], out: Path) -> Path:
    parts = [
        "# Selection study: auto against every fixed algorithm",
        "",
        "Made by `python -m experiments.selection` (table: `this_host.json` in the user "
        "tables directory; shipped as `conf/tables/this_host.json`). "
        "Times are medians over 30 iterations (3 interleaved rounds) of the slowest rank; a "
        "ratio's interval combines the order-statistic intervals (90%) of both medians. Per "
        "size the 5% goal is *met* (median ratio <= 1.05), *within noise* (above, but the "
        "interval reaches 1.05) or *missed*. `pick` is the candidate auto dispatched that "
        "size to. *auto (no shm)* chooses among the library-based algorithms only and is "
        "compared with the best of those.",
        "",
    ]
    outcomes: dict[str, Any] = {}
    for b in sorted(runs["bench"], key=lambda b: b["world_size"]):
        lines, outcome = size_table(b)
        parts += lines
        outcomes[f"p={b['world_size']}"] = outcome
    lines, e2e = e2e_table(runs["e2e"])
    parts += [
        f"### End to end (TP 2; every strategy a job of 3 repeats in each of {ROUNDS} rounds)",
        "",
        "Each job's median is one sample; the interval is over the jobs (placement of the ranks "
        "by the scheduler varies from job to job and is what dominates here).",
        "",
        *lines,
        "",
    ]
    outcomes["e2e"] = e2e
    parts += ["## Goals", "", *summary(outcomes), "", "```", json.dumps(outcomes, indent=1)]
    parts += ["```", ""]
    parts += ["![selection](selection.png)", ""]
    plot(runs, out)
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.selection", description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--runs", type=Path, help="runs.json of an earlier study: measure nothing")
    ap.add_argument(
        "--e2e-only",
        action="store_true",
        help="keep the message sweeps of --out's runs.json, measure the end-to-end rounds again",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        runs = json.loads(args.runs.read_text())
    elif args.e2e_only:
        runs = json.loads((args.out / "runs.json").read_text())
        runs["e2e"] = measure_e2e(ROOT / "multirun" / "selection")
        (args.out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    else:
        runs = measure(ROOT / "multirun" / "selection")
        (args.out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(write(runs, args.out).read_text())


if __name__ == "__main__":
    main()
