"""The sequence-parallel study's view (from ``experiment=sequence_parallel``): every
sequence-parallel run beside the all-reduce run of the same strategy, TP size and prompt
length: TTFT and decode ITL of both and their ratio, the prefill's collectives and the padding
(``README.md``), the TTFT ratio against prompt length (``sp.png``), the pairs (``runs.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.report import markdown, pyplot, save_png

KEY = ("strategy", "world_size", "prompt_len")
COLS = [*KEY, "ttft_ar_s", "ttft_sp_s", "ttft_sp_over_ar", "itl_ar_s", "itl_sp_s"]
COLS += ["itl_sp_over_ar", "prefill_collectives_ar", "prefill_collectives_sp", "sp_padded_tokens"]


def _collectives(r: dict[str, Any]) -> int:
    return sum(o["collectives"] for o in r["per_op"].get("prefill", {}).values())


def pair(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("sequence_parallel") is not None]
    ar = {tuple(r[k] for k in KEY): r for r in ok if not r["sequence_parallel"]}
    out = []
    for r in ok:
        base = ar.get(tuple(r[k] for k in KEY))
        if r["sequence_parallel"] and base is not None:
            out.append(
                {
                    **{k: r[k] for k in KEY},
                    "ttft_ar_s": base["ttft_s"],
                    "ttft_sp_s": r["ttft_s"],
                    "ttft_sp_over_ar": round(r["ttft_s"] / base["ttft_s"], 3),
                    "itl_ar_s": base["itl_p50_s"],
                    "itl_sp_s": r["itl_p50_s"],
                    "itl_sp_over_ar": round(r["itl_p50_s"] / base["itl_p50_s"], 3),
                    "prefill_collectives_ar": _collectives(base),
                    "prefill_collectives_sp": _collectives(r),
                    "sp_padded_tokens": r["sp_padded_tokens"],
                }
            )
    return sorted(out, key=lambda r: tuple(r[k] for k in KEY))


def view(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    paired = pair(rows)
    if not paired:
        raise ValueError(
            "no paired sequence-parallel and all-reduce runs: run experiment=sequence_parallel"
        )
    return write(paired, out)


def write(paired: list[dict[str, Any]], out: Path) -> list[Path]:
    """The table, the pairs and the plot of ``paired`` (:func:`pair`'s rows) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Sequence parallelism against all-reduce (small model, CPU ranks over gloo)",
        "",
        "Regenerate: `python -m experiments.infer -m experiment=sequence_parallel`, then",
        "`python -m experiments.report <sweep dir> --view sequence_parallel --out <this folder>`.",
        "",
        markdown(paired, COLS),
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    (out / "runs.json").write_text(json.dumps(paired, indent=1) + "\n")
    plt = pyplot()
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
    png = save_png(fig, out / "sp.png")
    return [out / "README.md", out / "runs.json", png]
