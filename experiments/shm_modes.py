"""Where shm's one-shot all-reduce stops beating its two-shot one on this host.

``python -m experiments.shm_modes [--world-sizes 2,3,4] [--out results/shm_modes.md]``

For each world size, on long-lived ranks, times ``shm mode=oneshot`` against ``shm
mode=twoshot`` with bench's loop (``framework.run.measure.sweep``: medians over iterations of
the slowest rank, the two interleaved in rounds so drift hits both alike) from 256 B to 4 MiB,
and reports the crossover: the largest size from which on two-shot is never slower. That is
the ``auto`` threshold ``strategies/shm.py`` ships (``ONESHOT_MAX_BYTES``). Measure on a quiet
host: anything else running moves the crossover.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = [256 << (2 * i) for i in range(8)]  # 256 B .. 4 MiB, x4


def _time_modes(sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from framework.comm.registry import build_communicator
    from framework.run.measure import SweepSpec, sweep

    one = build_communicator("shm", mode="oneshot", timeout_s=60)
    two = build_communicator("shm", mode="twoshot", timeout_s=60)
    try:
        spec = SweepSpec(sizes=tuple(sizes), warmup=5, iters=20, rounds=rounds)
        rows = sweep([one, two], spec, dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
        return rows["rows"]
    finally:
        one.close()
        two.close()


def crossover(rows: list[dict[str, Any]]) -> int:
    """The largest size up to which one-shot is at least as fast and after which it never is
    (0: two-shot wins from the smallest size)."""
    best = 0
    for r in rows:
        if r["time_us"] <= r["baseline_time_us"]:
            best = r["size"]
        else:
            break
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,3,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "shm_modes.md"))
    args = ap.parse_args(argv)
    from framework.testing.rankpool import RankPool

    lines = [
        "# shm: one-shot against two-shot on this host",
        "",
        "`python -m experiments.shm_modes`: medians (slowest rank) of "
        f"{args.rounds} interleaved rounds of 20 iterations per size.",
        "",
        "| world size | size (B) | one-shot (us) | two-shot (us) | two-shot / one-shot |",
        "|---|---|---|---|---|",
    ]
    found = {}
    for p in (int(s) for s in args.world_sizes.split(",")):
        pool = RankPool(p, pg_timeout_s=120)
        try:
            rows = pool.run(_time_modes, SIZES, args.rounds, timeout_s=600)[0]
        finally:
            pool.close()
        for r in rows:
            lines.append(
                f"| {p} | {r['size']} | {r['time_us']:.1f} | {r['baseline_time_us']:.1f} | "
                f"{r['baseline_time_us'] / r['time_us']:.2f} |"
            )
        found[p] = crossover(rows)
        print("\n".join(lines[-len(rows) :]), flush=True)
    lines += ["", "Crossover (auto's one-shot limit, ONESHOT_MAX_BYTES):", ""]
    lines += [f"- world size {p}: one-shot up to {b} B" for p, b in found.items()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(found))
    print("\n".join(lines[-len(found) - 2 :]))


if __name__ == "__main__":
    main()
