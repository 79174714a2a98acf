"""The shm-modes study's view: one-shot against two-shot per size and world size, and the
crossover that ``shm mode=auto`` ships (from ``experiment=shm_modes``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.report import markdown


def crossover(rows: list[dict[str, Any]]) -> int:
    """The largest size up to which one-shot is at least as fast as two-shot at every size
    (0: two-shot wins from the smallest size on)."""
    best = 0
    for r in sorted(rows, key=lambda r: r["size"]):
        if r["oneshot_us"] > r["twoshot_us"]:
            break
        best = r["size"]
    return best


def view(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    mine = [
        {
            "world_size": int(r["world_size"]),
            "size": int(r["size"]),
            "oneshot_us": float(r["time_us"]),
            "twoshot_us": float(r["baseline_time_us"]),
        }
        for r in rows
        if r.get("strategy") == "shm" and r.get("baseline") == "shm:mode=twoshot"
    ]
    if not mine:
        raise ValueError("no shm one-shot/two-shot bench rows: run experiment=shm_modes")
    mine.sort(key=lambda r: (r["world_size"], r["size"]))
    for r in mine:
        r["twoshot_over_oneshot"] = round(r["twoshot_us"] / r["oneshot_us"], 3)
    found = {
        p: crossover([r for r in mine if r["world_size"] == p])
        for p in sorted({r["world_size"] for r in mine})
    }
    lines = [
        "# shm: one-shot against two-shot on this host",
        "",
        "Regenerate: `python -m experiments.bench -m experiment=shm_modes`, then",
        "`python -m experiments.report <sweep dir> --view shm_modes --out <this folder>`.",
        "Medians of the slowest rank, one-shot and two-shot interleaved in the same run.",
        "",
        markdown(mine, ["world_size", "size", "oneshot_us", "twoshot_us", "twoshot_over_oneshot"]),
        "",
        "Crossover (`ONESHOT_MAX_BYTES` in strategies/shm.py: one-shot up to this size):",
        "",
        *[f"- world size {p}: {b} B" for p, b in found.items()],
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines))
    (out / "crossover.json").write_text(json.dumps(found) + "\n")
    return [out / "README.md", out / "crossover.json"]
