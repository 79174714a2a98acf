"""Check the seed claims against measurement and the simulator; write ``results/claims/``.

``python -m experiments.claims [--runs MULTIRUN_DIR | RUNS_JSON] [--out-dir results/claims]``

Without ``--runs`` it first runs ``python -m experiments.infer -m experiment=seed_claims``
(every strategy, TP 2, small model, 1/2/4 micro-batches) and saves the runs as ``runs.json``;
``--runs results/claims/runs.json`` regenerates the report from saved runs, measuring nothing.
It reads the cost model's validation (``experiments.calibrate`` output: measured tree and naive
times at world sizes 2-4; run it first if it is missing) and the CPU targets file
(``results/cpu_targets.json``, measured busbw against the copy limit) when present, runs the
simulator on the H100 presets, and writes ``REPORT.md`` with one row per claim and a verdict
computed from the numbers by the rule printed beside it, plus a plot. Each claim is one
function below that returns its row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.common import run_module
from experiments.simulate import shape_for
from framework.comm.registry import available_strategies, get_strategy
from framework.costmodel import allreduce_time, busbw_gbps, decode_step, load_topology
from framework.model import get_config
from framework.run.spread import median_interval, ratio_interval

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "claims"
Runs = dict[tuple[str, int], dict[str, Any]]  # (strategy, micro-batches) -> one run's results
NAN = float("nan")


def strategies() -> list[str]:
    """Every registered exact strategy, ``naive`` (the baseline of every comparison) first.
    The claims are about exact techniques: a quantized wire trades accuracy for its speed
    (``experiments.quantized_comm`` measures both)."""
    exact = [s for s in available_strategies() if get_strategy(s).exact]
    return ["naive", *[s for s in exact if s != "naive"]]


def run_sweep(out: Path) -> Path:
    run_module(["experiments.infer", "-m", "experiment=seed_claims", f"hydra.sweep.dir={out}"])
    return out


def table(runs: list[dict[str, Any]]) -> Runs:
    known = set(strategies())
    return {
        (r["strategy"], int(r["micro_batches"])): r
        for r in runs
        if r.get("status") == "ok" and r.get("strategy") in known
    }


def _pct(x: float) -> str:
    return f"{x:+.0%}"


def _spread(r: dict[str, Any], key: str) -> dict[str, Any]:
    """A metric's median and interval over the run's repeats (one run: a point)."""
    return (r.get("spread") or {}).get(key) or median_interval([r[key]])


def change(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, str, bool]:
    """``a``'s metric relative to ``b``'s: (median change, "+6% [-10%, +22%]", within
    noise: the interval holds no change). Single runs give no interval and are never
    "within noise" by this test; the report says how many repeats each run had."""
    ratio, lo, hi = ratio_interval(_spread(a, key), _spread(b, key))
    noise = lo <= 1.0 <= hi and lo < hi
    text = f"{_pct(ratio - 1)} [{_pct(lo - 1)}, {_pct(hi - 1)}]" + (
        " (within noise)" if noise else ""
    )
    return ratio - 1, text, noise


def _row(
    claim: str, measured: str, sim_8xh100: str, sim_multinode: str, verdict: str, rule: str
) -> dict[str, str]:
    return {
        "claim": claim,
        "measured": measured,
        "sim_8xh100": sim_8xh100,
        "sim_multinode": sim_multinode,
        "verdict": verdict,
        "rule": rule,
    }


def _decode_message() -> float:
    return shape_for("llama3-70b", 8).message_bytes


def _itl(topology: str, algorithm: str, p: int) -> float:
    """Simulated decode ITL of Llama-3-70B, batch 8."""
    return decode_step(load_topology(topology), algorithm, p, shape_for("llama3-70b", 8))["itl_s"]


# -- one function per claim ------------------------------------------------------------------
def claim_allreduce_count(t: Runs, layers: int) -> dict[str, str]:
    """1. all-reduces per forward: O(L) -> O(1)?"""
    per_layer = {key: r["collectives_per_token"] / layers for key, r in t.items()}
    fewest = min(per_layer.values())
    naive = "/".join(f"{per_layer.get(('naive', mb), NAN):.2f}" for mb in (1, 2, 4))
    fused = "/".join(f"{per_layer.get(('bucketed', mb), NAN):.2f}" for mb in (1, 2, 4))
    return _row(
        "1. all-reduce count per forward pass falls from O(L) to O(1)",
        f"collectives per layer per decode step: naive {naive} at 1/2/4 micro-batches; "
        f"bucketed {fused} (fusion across micro-batches); fewest of any exact strategy "
        f"{fewest:.2f}",
        "same count: it is set by the model's data dependencies, not the link",
        "same",
        "refuted" if fewest >= 2 - 1e-9 else "holds",
        "refuted if no exact strategy goes below 2 collectives per layer per step",
    )


def claim_overlap(t: Runs) -> dict[str, str]:
    """2. overlap hides 50-70% of communication latency."""
    hidden = {
        s: 1 - t[(s, 2)]["exposed_comm_s"] / t[("naive", 2)]["exposed_comm_s"]
        for s in ("async_overlap", "double_buffer")
        if (s, 2) in t and ("naive", 2) in t
    }
    ov = decode_step(
        load_topology("h100_nvlink"), "naive", 8, shape_for("llama3-70b", 8, 2), overlap=0.5
    )
    sim_hidden = 1 - ov["exposed_s"] / ov["comm_s"] if ov["comm_s"] else 0.0
    best = max(hidden.values(), default=NAN)
    return _row(
        "2. overlap hides 50-70% of perceived communication latency",
        "; ".join(
            f"{k}: {v:.0%} of naive's exposed comm hidden (TP 2, 2 micro-batches)"
            for k, v in hidden.items()
        ),
        f"Llama-3-70B TP 8, batch 8, 2 micro-batches: comm {ov['comm_s'] * 1e3:.2f} ms vs "
        f"compute {ov['compute_s'] * 1e3:.2f} ms per step; if half the compute can overlap, "
        f"{sim_hidden:.0%} is hidden (an upper bound: the model ignores SM and memory "
        f"contention)",
        "as 8xH100 within a node; across nodes comm grows and the hidden share falls",
        "holds"
        if best >= 0.5
        else "holds only under stated conditions"
        if sim_hidden >= 0.5
        else "refuted",
        "holds if measured >= 50%; conditional if only the simulator reaches 50%",
    )


def claim_bandwidth(targets: dict[str, Any] | None) -> dict[str, str]:
    """3. bandwidth utilisation 60% -> 85%."""
    host = ""
    for x in (targets or {}).get("targets", []):
        if x.get("target", "").startswith("shm busbw / single-core memcpy"):
            host = (
                f"shm busbw at 16 MiB = {x['measured']:.0%} of one core's copy bandwidth "
                f"({x['detail']})"
            )
    nv, ib, msg = load_topology("h100_nvlink"), load_topology("h100_ib"), _decode_message()
    util_small = busbw_gbps(8, msg, allreduce_time(nv, "naive", 8, msg)) / 450
    util_large = busbw_gbps(8, 1 << 30, allreduce_time(nv, "naive", 8, 1 << 30)) / 450
    util_64 = busbw_gbps(64, msg, allreduce_time(ib, "naive", 64, msg)) / 50
    return _row(
        "3. bandwidth utilisation rises from 60% to over 85%",
        host or "run python -m experiments.targets for the measured busbw",
        f"decode message {int(msg)} B: busbw {util_small:.0%} of the 450 GB/s line rate "
        f"(latency-bound); 1 GiB: {util_large:.0%} (NCCL's ceiling, any strategy)",
        f"p = 64: decode message busbw {util_64:.0%} of the 50 GB/s NIC",
        "refuted"
        if util_small < 0.6 and util_large < 0.85
        else "holds only under stated conditions",
        "refuted if neither decode-size nor large messages can exceed 85% of line rate",
    )


def claim_buffers(t: Runs) -> dict[str, str]:
    """4. allocations -90%, reuse 95%, peak memory -20-30%."""
    db, nv1, bk = t.get(("double_buffer", 2)), t.get(("naive", 2)), t.get(("bucketed", 2))
    reuse = db["buffer_reuses"] / max(db["buffer_allocs"] + db["buffer_reuses"], 1) if db else NAN
    peak = db["peak_mem_bytes"] / nv1["peak_mem_bytes"] - 1 if db and nv1 else NAN
    return _row(
        "4. allocations -90%, buffers reused 95% of the time, peak memory -20-30%",
        f"double_buffer: {db['buffer_allocs'] if db else '?'} buffers allocated, "
        f"{db['buffer_reuses'] if db else '?'} reuses in the measured run (reuse {reuse:.1%}); "
        f"bucketed {bk['buffer_allocs'] if bk else '?'} allocs; naive reduces in place "
        f"(0 buffers); peak memory double_buffer vs naive {_pct(peak)}",
        "not modelled (memory is not a communication cost)",
        "-",
        "holds only under stated conditions"
        if reuse >= 0.95 and peak > -0.2
        else "holds"
        if reuse >= 0.95 and peak <= -0.2
        else "refuted",
        "reuse >= 95% holds for a buffer pool after warm-up; peak memory must fall >= 20% "
        "for the whole claim to hold",
    )


def claim_throughput(t: Runs) -> dict[str, str]:
    """5. throughput +30-50% on one node, +40-60% across nodes."""
    b = t.get(("naive", 2))
    measured = {
        s: change(t[(s, 2)], b, "decode_tokens_per_s")
        for s in strategies()[1:]
        if (s, 2) in t and b
    }
    # a gain inside the noise is no gain: only gains the runs can show count
    gains = {s: g for s, (g, _, noise) in measured.items() if not noise}
    naive8, tree8 = _itl("h100_nvlink", "naive", 8), _itl("h100_nvlink", "tree", 8)
    naive16, tree16 = _itl("h100_ib", "naive", 16), _itl("h100_ib", "tree", 16)
    hier16 = _itl("h100_ib", "hierarchical", 16)
    best = max(gains.values(), default=0)
    return _row(
        "5. throughput +30-50% on one node (4-8 GPUs), +40-60% across nodes",
        "decode tok/s vs naive, TP 2, 2 micro-batches (median [interval]): "
        + ", ".join(f"{s} {text}" for s, (_, text, _) in measured.items()),
        f"Llama-3-70B TP 8 batch 8: tree vs naive ITL {_pct(tree8 / naive8 - 1)} -> "
        f"throughput {_pct(naive8 / tree8 - 1)}",
        f"TP 16 (2 nodes): hierarchical vs naive (flat ring) throughput "
        f"{_pct(naive16 / hier16 - 1)}, vs tree {_pct(tree16 / hier16 - 1)} (a flat ring pays "
        f"the IB latency at each of its 2(p-1) steps; NCCL itself switches to a tree for "
        f"small messages)",
        "holds"
        if best >= 0.3 and naive8 / tree8 - 1 >= 0.3
        else "holds only under stated conditions"
        if best >= 0.3
        else "refuted",
        "holds if both the host and the 8xH100 simulation gain >= 30%; conditional if only "
        "where communication dominates (here: a CPU host over gloo); a gain whose interval "
        "holds 0 is within noise and does not count",
    )


def claim_latency(t: Runs) -> dict[str, str]:
    """6. TTFT -15-25%, ITL -20-30%."""
    b = t.get(("naive", 2))
    others = [(s, t[(s, 2)]) for s in strategies()[1:] if (s, 2) in t and b]
    itl = {s: change(r, b, "itl_p50_s") for s, r in others}
    itl_gain = [g for g, _, noise in itl.values() if not noise]
    naive8, tree8 = _itl("h100_nvlink", "naive", 8), _itl("h100_nvlink", "tree", 8)
    naive16, tree16 = _itl("h100_ib", "naive", 16), _itl("h100_ib", "tree", 16)
    hier16 = _itl("h100_ib", "hierarchical", 16)
    comm8 = decode_step(load_topology("h100_nvlink"), "naive", 8, shape_for("llama3-70b", 8))[
        "comm_s"
    ]
    return _row(
        "6. TTFT -15-25%, ITL -20-30%",
        "vs naive, TP 2, 2 micro-batches (median [interval]): "
        + "; ".join(
            f"{s} TTFT {change(r, b, 'ttft_s')[1]}, ITL p50 {itl[s][1]}" for s, r in others
        ),
        f"ITL tree vs naive {_pct(tree8 / naive8 - 1)} (decode is weight-bound on HBM: comm "
        f"is {comm8 / naive8:.0%} of the step)",
        f"ITL at TP 16 (2 nodes): hierarchical vs naive {_pct(hier16 / naive16 - 1)}, vs tree "
        f"{_pct(hier16 / tree16 - 1)}",
        "holds only under stated conditions" if min(itl_gain, default=0) <= -0.2 else "refuted",
        "conditional if some strategy cuts ITL >= 20% here (where gloo dominates), outside "
        "the noise; the GPU simulation decides whether it carries over",
    )


def claim_tree_beats_ring(calib: dict[str, Any] | None) -> dict[str, str]:
    """7. tree O(log n) beats ring O(n) (``naive`` is the ring) as p grows."""
    meas = ""
    if calib:
        m = {
            (e["strategy"], e["world_size"], e["size"]): e["measured_us"]
            for e in calib["allreduce"]
        }
        meas = "1 KiB: " + "; ".join(
            f"p={p}: tree {m[('tree', p, 1024)]:.0f} us vs naive (gloo) "
            f"{m[('naive', p, 1024)]:.0f} us"
            for p in (2, 3, 4)
            if ("tree", p, 1024) in m and ("naive", p, 1024) in m
        )
    nv, ib, msg = load_topology("h100_nvlink"), load_topology("h100_ib"), _decode_message()
    tr = next(
        (
            p
            for p in (2**k for k in range(1, 11))
            if allreduce_time(ib, "tree", p, msg) < allreduce_time(ib, "naive", p, msg)
        ),
        None,
    )
    return _row(
        "tree O(log n) beats ring O(n)",
        meas or "run python -m experiments.calibrate",
        f"{int(msg)} B: tree {allreduce_time(nv, 'tree', 8, msg) * 1e6:.1f} us vs naive "
        f"{allreduce_time(nv, 'naive', 8, msg) * 1e6:.1f} us at p = 8",
        f"tree overtakes naive at p = {tr} for the decode message; naive wins for large "
        f"messages at every p",
        "holds only under stated conditions",
        "latency-bound (small) messages and many ranks only",
    )


def claims(
    t: Runs, calib: dict[str, Any] | None, targets: dict[str, Any] | None, layers: int
) -> list[dict[str, str]]:
    """Every claim's row, in the order of the seed claims."""
    return [
        claim_allreduce_count(t, layers),
        claim_overlap(t),
        claim_bandwidth(targets),
        claim_buffers(t),
        claim_throughput(t),
        claim_latency(t),
        claim_tree_beats_ring(calib),
    ]


# -- the report --------------------------------------------------------------------------------
def verdict_changes(old_report: str, rows: list[dict[str, str]], cause: str) -> list[str]:
    """The report's "Verdict changes" history: the lines it had, plus one per claim whose
    verdict differs from the old report's, with ``cause``."""
    kept, old = [], {}
    in_changes = False
    for line in old_report.splitlines():
        if line.startswith("## "):
            in_changes = line == "## Verdict changes"
        elif in_changes and line.startswith("- "):
            kept.append(line)
        elif line.startswith("| ") and "**" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            old[cells[0]] = cells[4].strip("*")
    new = [
        f"- {r['claim']}: {old[r['claim']]} -> {r['verdict']} ({cause})"
        for r in rows
        if r["claim"] in old and old[r["claim"]] != r["verdict"]
    ]
    return kept + new


def write_report(
    rows: list[dict[str, str]], t: Runs, out: Path, source: str, cause: str = "regenerated"
) -> None:
    previous = out / "REPORT.md"
    changes = verdict_changes(previous.read_text() if previous.exists() else "", rows, cause)
    lines = [
        "# The seed claims, checked",
        "",
        "Generated by `python -m experiments.claims` from the measured runs saved in "
        f"`{source}` (`experiment=seed_claims`: TP 2 on a 2-core CPU host over gloo, "
        "small model, `workload.repeats` runs per point: medians with their interval, "
        'changes with the interval of the ratio, "within noise" where it holds no '
        "change; `--runs` with that file regenerates this report "
        "without measuring), the calibration in `results/calibration/`, the targets in "
        "`results/cpu_targets.json`, and the cost model's simulation of 8xH100 (NVLink) "
        "and multi-node H100 (NDR InfiniBand) with constants fitted to published "
        "measurements (`conf/topology/`; the fit and its errors against the published "
        "tables: `results/published/CHECK.md`, sources: `results/published/SOURCES.md`). "
        "Simulated numbers are predictions, not measurements. "
        "Verdict rules are stated per row.",
        "",
        "| claim | measured here | simulated 8xH100 | simulated multi-node | verdict | rule |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['claim']} | {r['measured']} | {r['sim_8xh100']} | "
            f"{r['sim_multinode']} | **{r['verdict']}** | {r['rule']} |"
        )
    lines += [
        "",
        "## Measured runs (TP 2, small model, 32 new tokens)",
        "",
        "| strategy | micro-batches | repeats | decode tok/s | TTFT (s) | ITL p50 (s) | "
        "collectives/step | exposed comm share | allocs | reuses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = strategies()
    for (s, mb), r in sorted(t.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        d, ttft, itl = (_spread(r, k) for k in ("decode_tokens_per_s", "ttft_s", "itl_p50_s"))
        lines.append(
            f"| {s} | {mb} | {r.get('repeats', 1)} | {d['median']:.1f} [{d['lo']:.1f}, "
            f"{d['hi']:.1f}] | {ttft['median']:.3f} [{ttft['lo']:.3f}, {ttft['hi']:.3f}] | "
            f"{itl['median']:.4f} [{itl['lo']:.4f}, {itl['hi']:.4f}] | "
            f"{r['collectives_per_token']:.0f} | "
            f"{r['exposed_comm_share']:.0%} | {r['buffer_allocs']} | "
            f"{r['buffer_reuses']} |"
        )
    lines += ["", "![decode throughput](claims_decode.png)", ""]
    if changes:
        lines += ["## Verdict changes", "", *changes, ""]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def plot(t: Runs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in strategies() if any(key[0] == s for key in t)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mb, off in ((1, -0.27), (2, 0), (4, 0.27)):
        xs = [i + off for i, s in enumerate(names) if (s, mb) in t]
        have = [t[(s, mb)] for s in names if (s, mb) in t]
        spans = [_spread(r, "decode_tokens_per_s") for r in have]
        axes[0].bar(
            xs,
            [sp["median"] for sp in spans],
            width=0.27,
            label=f"{mb} micro-batches",
            yerr=[
                [sp["median"] - sp["lo"] for sp in spans],
                [sp["hi"] - sp["median"] for sp in spans],
            ],
            capsize=2,
        )
        axes[1].bar(
            xs, [r["collectives_per_token"] for r in have], width=0.27, label=f"{mb} micro-batches"
        )
    for ax, title in zip(
        axes, ("decode tokens/s (median, interval)", "collectives per decode step")
    ):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"{title} (TP 2, small)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "claims_decode.png", dpi=110)
    plt.close(fig)


def load_runs(runs: Path, out: Path) -> tuple[list[dict[str, Any]], Path]:
    """The runs and the file they are saved in: a runs.json as is, or a multirun directory's
    infer results, saved (without the generated tokens) as ``out/runs.json``."""
    if runs.is_file():
        return json.loads(runs.read_text()), runs
    full = [
        r
        for f in sorted(runs.rglob("results.json"))
        if (r := json.loads(f.read_text())).get("job_type", "infer") == "infer"
    ]
    keep = [{k: v for k, v in r.items() if k != "tokens"} for r in full]
    (out / "runs.json").write_text(json.dumps(keep, indent=1) + "\n")
    return keep, out / "runs.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--runs",
        help="an experiment=seed_claims multirun directory, or a saved "
        "runs.json (no new measurements)",
    )
    ap.add_argument("--calibration", default=str(ROOT / "results/calibration"))
    ap.add_argument("--targets", default=str(ROOT / "results/cpu_targets.json"))
    ap.add_argument("--out-dir", default=str(OUT))
    ap.add_argument(
        "--cause",
        default="regenerated",
        help="why verdicts may change (recorded beside each change in the report)",
    )
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(a.runs) if a.runs else run_sweep(ROOT / "multirun" / "seed_claims")
    runs, saved = load_runs(runs_dir, out)
    t = table(runs)
    if not t:
        raise SystemExit(f"no successful seed_claims runs in {runs_dir}")
    layers = get_config(next(iter(t.values()))["model"]).num_layers
    rows = claims(
        t, _read_json(Path(a.calibration) / "validation.json"), _read_json(Path(a.targets)), layers
    )
    plot(t, out)
    write_report(rows, t, out, _shown(saved), a.cause)
    print((out / "REPORT.md").read_text())


if __name__ == "__main__":
    main()
