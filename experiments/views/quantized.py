"""The quantized-communication study's view: accuracy on the trained model against bytes.

From a sweep of ``experiment=quantized_trained`` (one job per TP size, every format beside exact
communication): ``README.md`` (one row per format, block and TP size: perplexity ratio with its
interval, KL per token on the evaluation text, top-1 agreement there and on the prompts, first
divergence, wire bytes against exact, decode speed), ``quantized.png`` and
``accuracy_smollm2.json``, the accuracy table ``auto``'s ``error_budget`` reads
(:mod:`framework.comm.accuracy`; the copy commlab ships is ``conf/tables/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.report import markdown, pyplot, save_png
from framework.comm.accuracy import write_accuracy
from framework.comm.registry import strategy_label

PUBLISHED = """Published, not measured here: arXiv 2411.09510 (communication compression for
TP inference) reports 3.5-4.5x smaller all-reduce payloads with a "negligible" perplexity
increase; AMD's QuickReduce ships int8, int6 and int4 with groups of 32 and reports accuracy
problems at int4 on some models. Wire bytes below are against a float32 wire (the model runs
in float32): against bfloat16 halve the compression."""
COLS = [
    "world_size",
    "label",
    "wire_bytes_vs_exact",
    "ppl_ratio",
    "ppl_kl_per_token",
    "ppl_top1_agreement",
    "agreement",
    "first_divergence",
    "same_tokens_as_exact",
    "decode_tokens_per_s",
]


def view(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ppl_ratio") is not None]
    if not ok:
        raise ValueError("no run with a perplexity block: run experiment=quantized_trained")
    for r in ok:
        opts = {k: v for k, v in r["strategy_options"].items() if k in ("fmt", "block")}
        r["label"] = strategy_label(r["strategy"], opts)
        r["first_divergence"] = r["numerics"].get("first_divergence")
    ok.sort(key=lambda r: (r["world_size"], r["strategy"] != "naive", r["label"]))
    exact = next(r for r in ok if r["strategy"] == "naive")
    text = f"{exact['ppl_text']} ({exact['ppl_tokens']} tokens, sha256 {exact['sha256'][:12]}…)"
    lines = [
        "# Quantized communication on the trained model (SmolLM2-135M-Instruct)",
        "",
        "Regenerate: `python -m experiments.infer -m experiment=quantized_trained`, then",
        "`python -m experiments.report <sweep dir> --view quantized --out <this folder>`.",
        "",
        f"Perplexity ratio: perplexity with the strategy / with exact communication on {text},",
        "teacher-forced, with a 95% block-bootstrap interval. Exact perplexity: "
        + ", ".join(
            f"TP {r['world_size']}: {r['ppl_exact']:.4f}"
            for r in ok
            if r is exact or (r["strategy"] == "naive" and r["world_size"] != exact["world_size"])
        )
        + ".",
        "",
        markdown(ok, COLS),
        "",
        PUBLISHED,
        "",
    ]
    table = [
        {
            "strategy": r["label"],
            "world_size": r["world_size"],
            "ppl_change": r["ppl_ratio"] - 1,
            "ppl_change_hi": r["ppl_ratio_hi"] - 1,
            "kl_per_token": r["ppl_kl_per_token"],
        }
        for r in ok
        if r["strategy"] != "naive"
    ]
    meta = {"model": "smollm2", "eval_text": exact["ppl_text"], "sha256": exact["sha256"]}
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_accuracy(out / "accuracy_smollm2.json", table, meta), _plot(ok, out)]
    lines.append(f"![quantized]({paths[1].name})")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return [out / "README.md", *paths]


def _plot(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        if r["strategy"] == "naive":
            continue
        x = r["wire_bytes_vs_exact"]
        lo, hi = r["ppl_ratio"] - r["ppl_ratio_lo"], r["ppl_ratio_hi"] - r["ppl_ratio"]
        marker = "o" if r["world_size"] == 2 else "s"
        axes[0].errorbar(x, r["ppl_ratio"], yerr=[[lo], [hi]], fmt=marker, capsize=3)
        name = r["label"].removeprefix("quantized:")
        axes[0].annotate(f"{name} p={r['world_size']}", (x, r["ppl_ratio"]), fontsize=6)
        axes[1].scatter(x, max(r["ppl_kl_per_token"], 1e-9), marker=marker)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("perplexity / exact (95% interval)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("KL per token to exact (nats)")
    for ax in axes:
        ax.set_xlabel("bytes on the wire / exact (float32)")
        ax.grid(True, alpha=0.3)
    return save_png(fig, out / "quantized.png")
