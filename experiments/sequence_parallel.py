"""The sequence-parallel study's table and plot: ``python -m experiments.sequence_parallel DIR``.

Reads the ``results.json`` of an ``experiment=sequence_parallel`` sweep (``DIR``: its sweep
directory), pairs every sequence-parallel run with the all-reduce run of the same strategy,
world size and prompt length, and writes to ``--out`` (default ``results/sequence_parallel``):
``table.md`` (TTFT and decode ITL of both, their ratio, the collectives per step and the
padding), ``sp.png`` (TTFT ratio against prompt length) and ``runs.json`` (the rows, so
``--runs runs.json`` redraws them without measuring).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEY = ("strategy", "world_size", "prompt_len")


def load(sweep: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(sweep.glob("*/results.json")):
        r = json.loads(f.read_text())
        if r.get("status") != "ok":
            continue
        prefill = r["per_op"]["prefill"]
        rows.append(
            {
                "strategy": r["strategy"],
                "world_size": r["world_size"],
                "prompt_len": r["prompt_len"],
                "sp": r["sequence_parallel"],
                "ttft_s": r["ttft_s"],
                "itl_p50_s": r["itl_p50_s"],
                "prefill_collectives": sum(o["collectives"] for o in prefill.values()),
                "prefill_wire_bytes": sum(o["wire_bytes"] for o in prefill.values()),
                "sp_padded_tokens": r["sp_padded_tokens"],
            }
        )
    return rows


def pair(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ar = {tuple(r[k] for k in KEY): r for r in rows if not r["sp"]}
    out = []
    for r in rows:
        base = ar.get(tuple(r[k] for k in KEY))
        if r["sp"] and base is not None:
            out.append(
                {
                    **{k: r[k] for k in KEY},
                    "ttft_ar_s": base["ttft_s"],
                    "ttft_sp_s": r["ttft_s"],
                    "ttft_sp_over_ar": r["ttft_s"] / base["ttft_s"],
                    "itl_ar_s": base["itl_p50_s"],
                    "itl_sp_s": r["itl_p50_s"],
                    "itl_sp_over_ar": r["itl_p50_s"] / base["itl_p50_s"],
                    "prefill_collectives_ar": base["prefill_collectives"],
                    "prefill_collectives_sp": r["prefill_collectives"],
                    "sp_padded_tokens": r["sp_padded_tokens"],
                }
            )
    return sorted(out, key=lambda r: tuple(r[k] for k in KEY))


def write(paired: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| strategy | TP | prompt | TTFT AR (s) | TTFT SP (s) | SP / AR | ITL AR (ms) | "
        "ITL SP (ms) | SP / AR | prefill collectives AR / SP | padded tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in paired:
        lines.append(
            f"| {r['strategy']} | {r['world_size']} | {r['prompt_len']} | "
            f"{r['ttft_ar_s']:.3f} | {r['ttft_sp_s']:.3f} | {r['ttft_sp_over_ar']:.2f} | "
            f"{r['itl_ar_s'] * 1e3:.1f} | {r['itl_sp_s'] * 1e3:.1f} | "
            f"{r['itl_sp_over_ar']:.2f} | {r['prefill_collectives_ar']} / "
            f"{r['prefill_collectives_sp']} | {r['sp_padded_tokens']} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "runs.json").write_text(json.dumps(paired, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, ws in sorted({(r["strategy"], r["world_size"]) for r in paired}):
        pts = [r for r in paired if (r["strategy"], r["world_size"]) == (strategy, ws)]
        ax.plot(
            [r["prompt_len"] for r in pts],
            [r["ttft_sp_over_ar"] for r in pts],
            marker="o",
            label=f"{strategy}, TP {ws}",
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT: sequence-parallel / all-reduce")
    ax.set_title("Sequence parallelism on this host (small model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sp.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", nargs="?", help="the experiment=sequence_parallel sweep directory")
    ap.add_argument("--runs", help="a saved runs.json: redraw without measuring")
    ap.add_argument("--out", default=str(ROOT / "results" / "sequence_parallel"))
    args = ap.parse_args(argv)
    runs = Path(args.runs).read_text() if args.runs else None
    paired = json.loads(runs) if runs else pair(load(Path(args.sweep)))
    if not paired:
        raise SystemExit("no paired sequence-parallel and all-reduce runs found")
    write(paired, Path(args.out))
    print((Path(args.out) / "table.md").read_text())


if __name__ == "__main__":
    main()
