"""Check the seed claims against measurement and the simulator; write REPORT.md.

``python -m experiments.claims [--runs MULTIRUN_DIR] [--calibration results/calibration]``

Without ``--runs`` it first runs ``python -m experiments.infer -m experiment=seed_claims``
(every strategy, TP 2, small model, 1/2/4 micro-batches). It reads the cost model's validation
(``experiments.calibrate`` output: measured tree and ring times at world sizes 2-4; run it first
if it is missing) and the CPU targets file (``results/cpu_targets.json``, measured busbw against
the copy limit) when present, runs the simulator on the H100 presets, and writes
``experiments/claims/REPORT.md`` with one row per claim and a verdict computed from the numbers
by the rule printed beside it, plus plots in ``experiments/claims/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from experiments.simulate import shape_for
from framework.costmodel import allreduce_time, busbw_gbps, decode_step, load_topology
from framework.model import get_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STRATEGIES = ["naive", "bucketed", "async_overlap", "double_buffer", "tree", "hierarchical",
              "adaptive_threshold", "shm"]


def run_sweep(out: Path) -> Path:
    cmd = [sys.executable, "-m", "experiments.infer", "-m", "experiment=seed_claims",
           f"hydra.sweep.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=3600)
    return out


def table(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        if r.get("status") == "ok" and r.get("strategy") in STRATEGIES:
            out[(r["strategy"], int(r["micro_batches"]))] = r
    return out


def _pct(x: float) -> str:
    return f"{x:+.0%}"


def claims(t: dict[tuple[str, int], dict[str, Any]], calib: dict[str, Any] | None,
           targets: dict[str, Any] | None, layers: int) -> list[dict[str, str]]:
    nv, ib = load_topology("h100_nvlink"), load_topology("h100_ib")
    s70 = shape_for("llama3-70b", 8)
    rows = []

    # 1. all-reduces per forward: O(L) -> O(1)?
    per_layer = {(s, mb): t[(s, mb)]["collectives_per_token"] / layers for (s, mb) in t}
    fewest = min(per_layer.values())
    fused = {mb: per_layer.get(("bucketed", mb)) for mb in (1, 2, 4)}
    rows.append({
        "claim": "1. all-reduce count per forward pass falls from O(L) to O(1)",
        "measured": f"collectives per layer per decode step: naive "
                    f"{per_layer.get(('naive', 1), float('nan')):.2f}/"
                    f"{per_layer.get(('naive', 2), float('nan')):.2f}/"
                    f"{per_layer.get(('naive', 4), float('nan')):.2f} at 1/2/4 micro-batches; "
                    f"bucketed {fused[1]:.2f}/{fused[2]:.2f}/{fused[4]:.2f} (fusion across "
                    f"micro-batches); fewest of any exact strategy {fewest:.2f}",
        "sim_8xh100": "same count: it is set by the model's data dependencies, not the link",
        "sim_multinode": "same",
        "verdict": "refuted" if fewest >= 2 - 1e-9 else "holds",
        "rule": "refuted if no exact strategy goes below 2 collectives per layer per step",
    })

    # 2. overlap hides 50-70% of communication latency
    hidden = {}
    for s in ("async_overlap", "double_buffer"):
        for inner_run in (("naive", 2),):
            if (s, 2) in t and inner_run in t:
                hidden[s] = 1 - t[(s, 2)]["exposed_comm_s"] / t[inner_run]["exposed_comm_s"]
    ov = decode_step(nv, "ring", 8, shape_for("llama3-70b", 8, 2), overlap=0.5)
    sim_hidden = 1 - ov["exposed_s"] / ov["comm_s"] if ov["comm_s"] else 0.0
    best = max(hidden.values(), default=float("nan"))
    rows.append({
        "claim": "2. overlap hides 50-70% of perceived communication latency",
        "measured": "; ".join(f"{k}: {v:.0%} of naive's exposed comm hidden (TP 2, 2 "
                              f"micro-batches)" for k, v in hidden.items()),
        "sim_8xh100": f"Llama-3-70B TP 8, batch 8, 2 micro-batches: comm "
                      f"{ov['comm_s'] * 1e3:.2f} ms vs compute {ov['compute_s'] * 1e3:.2f} ms "
                      f"per step; if half the compute can overlap, {sim_hidden:.0%} is hidden "
                      f"(an upper bound: the model ignores SM and memory contention)",
        "sim_multinode": "as 8xH100 within a node; across nodes comm grows and the hidden "
                         "share falls",
        "verdict": ("holds" if best >= 0.5 else
                    "holds only under stated conditions" if sim_hidden >= 0.5 else "refuted"),
        "rule": "holds if measured >= 50%; conditional if only the simulator reaches 50%",
    })

    # 3. bandwidth utilisation 60% -> 85%
    host = ""
    if targets:
        for x in targets["targets"]:
            if x.get("target", "").startswith("shm busbw / single-core memcpy"):
                host = f"shm busbw at 16 MiB = {x['measured']:.0%} of one core's copy " \
                       f"bandwidth ({x['detail']})"
    msg = shape_for("llama3-70b", 8).message_bytes
    t8 = allreduce_time(nv, "ring", 8, msg)
    util_small = busbw_gbps(8, msg, t8) / 450
    util_large = busbw_gbps(8, 1 << 30, allreduce_time(nv, "ring", 8, 1 << 30)) / 450
    t64 = allreduce_time(ib, "ring", 64, msg)
    rows.append({
        "claim": "3. bandwidth utilisation rises from 60% to over 85%",
        "measured": host or "run python -m experiments.targets for the measured busbw",
        "sim_8xh100": f"decode message {int(msg)} B: busbw {util_small:.0%} of the 450 GB/s "
                      f"line rate (latency-bound); 1 GiB: {util_large:.0%} (NCCL's ceiling, "
                      f"any strategy)",
        "sim_multinode": f"p = 64: decode message busbw {busbw_gbps(64, msg, t64) / 50:.0%} "
                         f"of the 50 GB/s NIC",
        "verdict": "refuted" if util_small < 0.6 and util_large < 0.85 else
                   "holds only under stated conditions",
        "rule": "refuted if neither decode-size nor large messages can exceed 85% of line rate",
    })

    # 4. allocations -90%, reuse 95%, peak memory -20-30%
    db, nv1 = t.get(("double_buffer", 2)), t.get(("naive", 2))
    bk = t.get(("bucketed", 2))
    reuse = (db["buffer_reuses"] / max(db["buffer_allocs"] + db["buffer_reuses"], 1)
             if db else float("nan"))
    peak = db["peak_mem_bytes"] / nv1["peak_mem_bytes"] - 1 if db and nv1 else float("nan")
    rows.append({
        "claim": "4. allocations -90%, buffers reused 95% of the time, peak memory -20-30%",
        "measured": f"double_buffer: {db['buffer_allocs'] if db else '?'} buffers allocated, "
                    f"{db['buffer_reuses'] if db else '?'} reuses in the measured run (reuse "
                    f"{reuse:.1%}); bucketed {bk['buffer_allocs'] if bk else '?'} allocs; naive "
                    f"reduces in place (0 buffers); peak memory double_buffer vs naive "
                    f"{_pct(peak)}",
        "sim_8xh100": "not modelled (memory is not a communication cost)",
        "sim_multinode": "-",
        "verdict": ("holds only under stated conditions" if reuse >= 0.95 and peak > -0.2
                    else "holds" if reuse >= 0.95 and peak <= -0.2 else "refuted"),
        "rule": "reuse >= 95% holds for a buffer pool after warm-up; peak memory must fall "
                ">= 20% for the whole claim to hold",
    })

    # 5 and 6. throughput, TTFT, ITL changes per strategy
    lines5, lines6 = [], []
    base = {mb: t.get(("naive", mb)) for mb in (1, 2, 4)}
    gains = []
    for s in STRATEGIES[1:]:
        r, b = t.get((s, 2)), base[2]
        if r and b:
            g = r["decode_tokens_per_s"] / b["decode_tokens_per_s"] - 1
            gains.append(g)
            lines5.append(f"{s} {_pct(g)}")
            lines6.append(f"{s} TTFT {_pct(r['ttft_s'] / b['ttft_s'] - 1)}, ITL p50 "
                          f"{_pct(r['itl_p50_s'] / b['itl_p50_s'] - 1)}")
    ring8 = decode_step(nv, "ring", 8, s70)["itl_s"]
    tree8 = decode_step(nv, "tree", 8, s70)["itl_s"]
    ring16 = decode_step(ib, "ring", 16, s70)["itl_s"]
    tree16 = decode_step(ib, "tree", 16, s70)["itl_s"]
    hier16 = decode_step(ib, "hierarchical", 16, s70)["itl_s"]
    rows.append({
        "claim": "5. throughput +30-50% on one node (4-8 GPUs), +40-60% across nodes",
        "measured": "decode tok/s vs naive, TP 2, 2 micro-batches: " + ", ".join(lines5),
        "sim_8xh100": f"Llama-3-70B TP 8 batch 8: tree vs ring ITL {_pct(tree8 / ring8 - 1)} "
                      f"-> throughput {_pct(ring8 / tree8 - 1)}",
        "sim_multinode": f"TP 16 (2 nodes): hierarchical vs flat ring throughput "
                         f"{_pct(ring16 / hier16 - 1)}, vs tree {_pct(tree16 / hier16 - 1)} (a "
                         f"flat ring pays the IB latency at each of its 2(p-1) steps; NCCL "
                         f"itself switches to a tree for small messages)",
        "verdict": ("holds" if max(gains, default=0) >= 0.3 and ring8 / tree8 - 1 >= 0.3 else
                    "holds only under stated conditions" if max(gains, default=0) >= 0.3
                    else "refuted"),
        "rule": "holds if both the host and the 8xH100 simulation gain >= 30%; conditional if "
                "only where communication dominates (here: a CPU host over gloo)",
    })
    itl_gain = [r["itl_p50_s"] / base[2]["itl_p50_s"] - 1 for (s, mb), r in t.items()
                if mb == 2 and s != "naive" and base[2]]
    rows.append({
        "claim": "6. TTFT -15-25%, ITL -20-30%",
        "measured": "vs naive, TP 2, 2 micro-batches: " + "; ".join(lines6),
        "sim_8xh100": f"ITL tree vs ring {_pct(tree8 / ring8 - 1)} (decode is weight-bound "
                      f"on HBM: comm is {decode_step(nv, 'ring', 8, s70)['comm_s'] / ring8:.0%}"
                      f" of the step)",
        "sim_multinode": f"ITL at TP 16 (2 nodes): hierarchical vs ring "
                         f"{_pct(hier16 / ring16 - 1)}, vs tree {_pct(hier16 / tree16 - 1)}",
        "verdict": ("holds only under stated conditions" if min(itl_gain, default=0) <= -0.2
                    else "refuted"),
        "rule": "conditional if some strategy cuts ITL >= 20% here (where gloo dominates); "
                "the GPU simulation decides whether it carries over",
    })

    # 7. tree vs ring as p grows
    meas = ""
    if calib:
        m = {(e["strategy"], e["world_size"], e["size"]): e["measured_us"]
             for e in calib["allreduce"]}
        parts = []
        for p in (2, 3, 4):
            if ("tree", p, 1024) in m and ("naive", p, 1024) in m:
                parts.append(f"p={p}: tree {m[('tree', p, 1024)]:.0f} us vs ring (gloo) "
                             f"{m[('naive', p, 1024)]:.0f} us")
        meas = "1 KiB: " + "; ".join(parts)
    xs = [2 ** k for k in range(1, 11)]
    tr = next((p for p in xs if allreduce_time(ib, "tree", p, msg)
               < allreduce_time(ib, "ring", p, msg)), None)
    rows.append({
        "claim": "tree O(log n) beats ring O(n)",
        "measured": meas or "run python -m experiments.calibrate",
        "sim_8xh100": f"{int(msg)} B: tree {allreduce_time(nv, 'tree', 8, msg) * 1e6:.1f} us vs "
                      f"ring {allreduce_time(nv, 'ring', 8, msg) * 1e6:.1f} us at p = 8",
        "sim_multinode": f"tree overtakes ring at p = {tr} for the decode message; ring wins "
                         f"for large messages at every p",
        "verdict": "holds only under stated conditions",
        "rule": "latency-bound (small) messages and many ranks only",
    })
    return rows


def write_report(rows: list[dict[str, str]], t: dict, out: Path, source: str) -> None:
    lines = ["# The seed claims, checked", "",
             "Generated by `python -m experiments.claims` from the measured runs saved in "
             f"`{source}` (`experiment=seed_claims`: TP 2 on a 2-core CPU host over gloo, "
             "small model, one run per point), the calibration in `results/calibration/`, "
             "the targets in `results/cpu_targets.json`, and the cost model's simulation "
             "of 8xH100 (NVLink) and multi-node H100 (NDR InfiniBand) with published "
             "constants (`conf/topology/`). Simulated numbers are predictions, not "
             "measurements. Verdict rules are stated per row.", "",
             "| claim | measured here | simulated 8xH100 | simulated multi-node | verdict | rule |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['measured']} | {r['sim_8xh100']} | "
                     f"{r['sim_multinode']} | **{r['verdict']}** | {r['rule']} |")
    lines += ["", "## Measured runs (TP 2, small model, 32 new tokens)", "",
              "| strategy | micro-batches | decode tok/s | TTFT (s) | ITL p50 (s) | "
              "collectives/step | exposed comm share | allocs | reuses |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (s, mb), r in sorted(t.items(), key=lambda kv: (kv[0][1], STRATEGIES.index(kv[0][0]))):
        lines.append(f"| {s} | {mb} | {r['decode_tokens_per_s']:.1f} | {r['ttft_s']:.3f} | "
                     f"{r['itl_p50_s']:.4f} | {r['collectives_per_token']:.0f} | "
                     f"{r['exposed_comm_share']:.0%} | {r['buffer_allocs']} | "
                     f"{r['buffer_reuses']} |")
    lines += ["", "![decode throughput](claims_decode.png)", ""]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def plot(t: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mb, off in ((1, -0.27), (2, 0), (4, 0.27)):
        xs = [i + off for i, s in enumerate(STRATEGIES) if (s, mb) in t]
        axes[0].bar(xs, [t[(s, mb)]["decode_tokens_per_s"] for s in STRATEGIES if (s, mb) in t],
                    width=0.27, label=f"{mb} micro-batches")
        axes[1].bar(xs, [t[(s, mb)]["collectives_per_token"] for s in STRATEGIES
                         if (s, mb) in t], width=0.27, label=f"{mb} micro-batches")
    for ax, title in zip(axes, ("decode tokens/s", "collectives per decode step")):
        ax.set_xticks(range(len(STRATEGIES)), STRATEGIES, rotation=30, ha="right")
        ax.set_title(f"{title} (TP 2, small)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "claims_decode.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", help="an experiment=seed_claims multirun directory")
    ap.add_argument("--calibration", default=str(ROOT / "results/calibration"))
    ap.add_argument("--targets", default=str(ROOT / "results/cpu_targets.json"))
    ap.add_argument("--out-dir", default=str(HERE))
    a = ap.parse_args(argv)
    runs_dir = Path(a.runs) if a.runs else run_sweep(ROOT / "multirun" / "seed_claims")
    out = Path(a.out_dir)
    if runs_dir.is_file():  # a runs.json written by an earlier report
        full = json.loads(runs_dir.read_text())
    else:
        full = [r for f in sorted(runs_dir.rglob("results.json"))
                if (r := json.loads(f.read_text())).get("job_type", "infer") == "infer"]
        keep = [{k: v for k, v in r.items() if k != "tokens"} for r in full]
        (out / "runs.json").write_text(json.dumps(keep, indent=1) + "\n")
    t = table(full)
    if not t:
        raise SystemExit(f"no successful seed_claims runs in {runs_dir}")
    calib_path = Path(a.calibration) / "validation.json"
    calib = json.loads(calib_path.read_text()) if calib_path.exists() else None
    tpath = Path(a.targets)
    targets = json.loads(tpath.read_text()) if tpath.exists() else None
    layers = get_config(next(iter(t.values()))["model"]).num_layers
    rows = claims(t, calib, targets, layers)
    plot(t, out)
    write_report(rows, t, out, "experiments/claims/runs.json")
    print((out / "REPORT.md").read_text())


if __name__ == "__main__":
    main()
