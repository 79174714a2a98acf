"""The cost model's reduce-scatter, all-gather, one-shot and two-shot formulas against
measurement on this host: ``python -m experiments.calibrate_ops [--out-dir results/calibration]``.

Measures, with bench's loop (``framework.run.measure.sweep``: medians of the slowest rank,
``--rounds`` interleaved passes), every key of ``framework.costmodel.OP_KEYS`` (naive's and
shm's reduce-scatter and all-gather, the oneshot and twoshot all-reduce strategies) at 1 KiB
to 1 MiB (the whole buffer, as nccl-tests counts it) and world sizes 2, 3 and 4; fits each
key's alpha, beta and overhead as ``experiments.calibrate`` fits the all-reduce algorithms
(:func:`framework.costmodel.fit`), and reports the median relative error of the prediction,
fitted on every world size, fitted on 2 and 4 over every world size (the measure the
all-reduce check uses), and on world size 3 alone (held out). Writes ``ops.md``
and ``ops.json`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from framework.costmodel import OP_KEYS, Link, Topology, allreduce_time, fit

ROOT = Path(__file__).resolve().parents[1]
SIZES = [1024 << (2 * i) for i in range(6)]  # 1 KiB .. 1 MiB, x4


def _measure(keys: list[str], sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from framework.comm.registry import build_communicator
    from framework.run.measure import SweepSpec, sweep

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    comms = {}
    for key in keys:
        strategy, _, op = key.partition("/")
        comms[key] = (build_communicator(strategy, timeout_s=60), op or "all_reduce")
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(rounds):
            for key, (comm, op) in comms.items():
                spec = SweepSpec(sizes=tuple(sizes), warmup=2, iters=10, op=op)
                for r in sweep([comm], spec, rank, world, torch.device("cpu"))["rows"]:
                    times.setdefault((key, r["size"]), []).append(r["time_us"])
    finally:
        for comm, _ in comms.values():
            comm.close()
    return [
        {"key": k, "world_size": world, "size": s, "time_us": statistics.median(ts)}
        for (k, s), ts in times.items()
    ]


def measure(world_sizes: list[int], rounds: int = 3, sizes: list[int] = SIZES) -> list[dict]:
    from framework.testing.rankpool import RankPool

    rows = []
    for p in world_sizes:
        pool = RankPool(p, pg_timeout_s=120)
        try:
            rows += pool.run(_measure, list(OP_KEYS), sizes, rounds, timeout_s=600)[0]
        finally:
            pool.close()
    return rows


def errors(
    rows: list[dict[str, Any]], fit_on: set[int] | None = None, held_out_only: bool = False
) -> dict[str, float]:
    """Median relative error per key of the model fitted on ``fit_on`` world sizes (None:
    all), over every row (as the all-reduce check does) or only the held-out rows."""
    return {k: statistics.median(v) for k, v in row_errors(rows, fit_on, held_out_only).items()}


def row_errors(
    rows: list[dict[str, Any]], fit_on: set[int] | None = None, held_out_only: bool = False
) -> dict[str, list[float]]:
    """Each key's relative errors, row by row (see :func:`errors`)."""
    cores = os.cpu_count()
    link = Link(1e-3, 1e-9)
    out = {}
    for key in OP_KEYS:
        mine = [r for r in rows if r["key"] == key]
        train = [r for r in mine if fit_on is None or r["world_size"] in fit_on]
        test = [r for r in mine if not held_out_only or r["world_size"] not in fit_on]
        if not train or not test:
            continue
        data = [(r["world_size"], r["size"], r["time_us"] * 1e-6) for r in train]
        topo = Topology(
            name="this_host",
            ranks_per_node=max(r["world_size"] for r in mine),
            intra=link,
            inter=link,
            cores=cores,
            fits={key: fit(data, key, cores=cores)},
        )
        out[key] = [
            abs(allreduce_time(topo, key, r["world_size"], r["size"]) * 1e6 - r["time_us"])
            / r["time_us"]
            for r in test
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,3,4")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out-dir", default=str(ROOT / "results" / "calibration"))
    args = ap.parse_args(argv)
    ws = [int(s) for s in args.world_sizes.split(",")]
    rows = measure(ws, args.rounds)
    every, two_four, held = errors(rows), errors(rows, {2, 4}), errors(rows, {2, 4}, True)
    lines = [
        "# Cost model: reduce-scatter, all-gather, one-shot and two-shot against measurement",
        "",
        f"`python -m experiments.calibrate_ops`: world sizes {ws}, 1 KiB-1 MiB, medians of "
        f"{args.rounds} interleaved rounds. Median relative error of the fitted model (goal: "
        "at most 25%).",
        "",
        "| key | fitted on every world size | fitted on 2 and 4, over 2-4 (the all-reduce "
        "check's measure) | fitted on 2 and 4, world size 3 only |",
        "|---|---|---|---|",
    ]
    for key in OP_KEYS:
        lines.append(
            f"| {key} | {every[key]:.1%} | {two_four.get(key, float('nan')):.1%} | "
            f"{held.get(key, float('nan')):.1%} |"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ops.md").write_text("\n".join(lines) + "\n")
    (out / "ops.json").write_text(
        json.dumps({"rows": rows, "every": every, "fit_2_4": two_four, "held_3": held})
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
