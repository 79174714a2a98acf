"""The selection-under-budget study's view: what auto chose within each budget, how fast it
ran and what it cost in accuracy, per TP size (from ``experiment=selection_budget``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.report import markdown

COLS = ["world_size", "auto", "served", "decode_tokens_per_s", "ttft_s", "ppl_ratio"]
COLS += ["ppl_kl_per_token", "ppl_top1_agreement", "same_tokens_as_exact"]


def view(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("strategy") == "auto"]
    if not ok:
        raise ValueError("no auto run: run experiment=selection_budget")
    for r in ok:
        budget = r["strategy_options"].get("error_budget")
        offered = r["strategy_options"].get("candidates") or []
        r["auto"] = f"within {budget}" if budget else "exact candidates"
        if offered and "shm" not in offered:
            r["auto"] += ", no shm"
        calls = {
            k.removeprefix("auto_").removesuffix("_calls"): v
            for k, v in (r.get("comm_extra") or {}).items()
            if k.endswith("_calls") and k != "auto_untuned_calls" and v
        }
        r["served"] = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
    ok.sort(
        key=lambda r: (r["world_size"], "no shm" in r["auto"], "within" in r["auto"], r["auto"])
    )
    lines = [
        "# Selection under an error budget (SmolLM2-135M-Instruct)",
        "",
        "Regenerate: `python -m experiments.infer -m experiment=selection_budget`, then",
        "`python -m experiments.report <sweep dir> --view selection --out <this folder>`.",
        "Budgets bound the top of the perplexity ratio's interval, as measured by the quantized",
        "study (`conf/tables/accuracy_smollm2.json`); `served`: calls per candidate (prefill and",
        "decode; 60 per forward).",
        "Speed: medians [interval] over 3 interleaved rounds; accuracy: against exact",
        "communication on the same ranks (perplexity on 2,048 tokens of python-docs).",
        "",
        markdown(ok, COLS),
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return [out / "README.md"]
