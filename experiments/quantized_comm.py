"""The quantized-communication study: what each wire format costs in accuracy and buys in time.

``python -m experiments.quantized_comm [--out results/quantized_comm] [--runs RUNS_JSON]``

Runs ``experiments.infer -m experiment=quantized_comm`` (every ``fmt`` at blocks 32 and 256,
prefill-heavy and decode-heavy workloads, exact reference in the same job, 3 repeats, TP 2) on
the small preset and on a local Hugging Face checkpoint, and the exact strategies ``naive``,
``shm`` and ``oneshot`` (the quantized strategy's own one-shot shape, exact) on the same
workloads (``--exact-only`` reruns just those). No trained weights can be downloaded here,
so the checkpoint is a ``transformers``-initialised Llama written once under
``multirun/quantized_comm/``: its numbers show how wire error propagates through a Llama with
Hugging Face's initialisation, not what a trained model would lose. Writes ``README.md`` (one
row per run: agreement, first divergence, KL, logit error, wire bytes, TTFT and decode speed
with intervals and their ratio to each exact strategy), ``quantized_comm.png`` and
``runs.json`` (``--runs`` redraws from it, measuring nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.common import run_module
from framework.run.spread import ratio_interval

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "quantized_comm"
SWEEPS = ROOT / "multirun" / "quantized_comm"
HF_SHAPE = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
# exact baselines: the library, shared memory, and oneshot (exact, with the quantized
# strategy's own one-shot structure: it separates what the bytes save from what the shape does)
EXACT = ("naive", "shm", "oneshot")


def hf_checkpoint(path: Path) -> Path:
    """A Llama checkpoint in Hugging Face's format, initialised by ``transformers`` (seed 0)."""
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SHAPE))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _infer(*args: str) -> None:
    run_module(["experiments.infer", "-m", *args])


def _models(sweeps: Path) -> dict[str, list[str]]:
    ckpt = hf_checkpoint(sweeps / "hf-llama")
    return {"small": ["model=small"], "hf-llama": ["model=hf", f"model.checkpoint={ckpt}"]}


def measure(sweeps: Path, exact_only: bool = False) -> list[dict[str, Any]]:
    models = _models(sweeps)
    exact = [
        "workload=prefill_heavy,decode_heavy",
        f"strategy={','.join(EXACT)}",
        "workload.reference=exact",
        "workload.repeats=3",
        "model.max_seq_len=544",
        "logger=none",
        "progress=false",
    ]
    for name, model in models.items():
        if not exact_only:
            _infer(
                "experiment=quantized_comm", *model, f"hydra.sweep.dir={sweeps}/{name}/quantized"
            )
        _infer(*exact, *model, f"hydra.sweep.dir={sweeps}/{name}/exact")
    return collect(sweeps)


def collect(sweeps: Path) -> list[dict[str, Any]]:
    """The rows of every finished run under ``sweeps``."""
    models = ("small", "hf-llama")
    rows = []
    for name in models:
        for f in sorted((sweeps / name).glob("*/*/results.json")):
            r = json.loads(f.read_text())
            if r.get("status") == "ok":
                rows.append(_row(name, r))
    return rows


def _row(model: str, r: dict[str, Any]) -> dict[str, Any]:
    o = r["strategy_options"]
    label = r["strategy"]
    if r["strategy"] == "quantized":
        label = f"{o['fmt']}/{o['block']}"
    return {
        "model": model,
        "workload": "prefill" if r["prompt_len"] >= 256 else "decode",
        "strategy": label,
        "numerics": r["numerics"],
        "spread": {k: r["spread"][k] for k in ("ttft_s", "decode_tokens_per_s")},
    }


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    if base is None:
        return ""
    ratio, lo, hi = ratio_interval(row["spread"][key], base["spread"][key])
    return f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | workload | wire | agreement | first diverged | KL (nats) | max logit err | "
        "wire / exact | TTFT ms | decode tok/s | "
        + " | ".join(f"TTFT / {b}" for b in EXACT)
        + " | "
        + " | ".join(f"decode / {b}" for b in EXACT)
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(EXACT)}
    for r in sorted(
        rows, key=lambda r: (r["model"], r["workload"], order.get(r["strategy"], 9), r["strategy"])
    ):
        base = {
            s: next(
                (
                    b
                    for b in rows
                    if (b["model"], b["workload"], b["strategy"]) == (r["model"], r["workload"], s)
                ),
                None,
            )
            for s in EXACT
        }
        n, t, d = r["numerics"], r["spread"]["ttft_s"], r["spread"]["decode_tokens_per_s"]
        div = "never" if n["first_divergence"] is None else f"step {n['first_divergence']}"
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['strategy']} | {n['agreement']:.3f} | {div} | "
            f"{n['kl_mean']:.2e} | {n['logit_max_abs_err']:.3g} | "
            f"{n['wire_bytes_vs_exact']:.3f} | {t['median'] * 1e3:.0f} "
            f"[{t['lo'] * 1e3:.0f}, {t['hi'] * 1e3:.0f}] | {d['median']:.1f} "
            f"[{d['lo']:.1f}, {d['hi']:.1f}] | "
            + " | ".join(_ratio(r, base[b], "ttft_s") for b in EXACT)
            + " | "
            + " | ".join(_ratio(r, base[b], "decode_tokens_per_s") for b in EXACT)
            + " |"
        )
    return lines


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    from experiments.report import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        if r["strategy"] in EXACT:
            continue
        kl = max(r["numerics"]["kl_mean"], 1e-12)
        marker = "o" if r["model"] == "small" else "s"
        color = "C0" if r["workload"] == "prefill" else "C1"
        base = next(
            b
            for b in rows
            if (b["model"], b["workload"], b["strategy"]) == (r["model"], r["workload"], "naive")
        )
        key = "ttft_s" if r["workload"] == "prefill" else "decode_tokens_per_s"
        speed, lo, hi = ratio_interval(base["spread"][key], r["spread"][key])
        if key == "decode_tokens_per_s":  # higher is better: invert to "speed-up"
            speed, lo, hi = 1 / speed, 1 / hi, 1 / lo
        axes[0].scatter(r["numerics"]["wire_bytes_vs_exact"], kl, marker=marker, color=color)
        axes[0].annotate(r["strategy"], (r["numerics"]["wire_bytes_vs_exact"], kl), fontsize=6)
        axes[1].errorbar(
            kl, speed, yerr=[[speed - lo], [hi - speed]], fmt=marker, color=color, capsize=2
        )
        axes[1].annotate(r["strategy"], (kl, speed), fontsize=6)
    axes[0].set_xlabel("bytes on the wire / exact")
    axes[0].set_ylabel("mean KL to exact (nats)")
    axes[0].set_yscale("log")
    axes[1].set_xscale("log")
    axes[1].axhline(1.0, color="k", lw=1, ls=":")
    axes[1].set_xlabel("mean KL to exact (nats)")
    axes[1].set_ylabel("speed-up over naive (prefill: TTFT, decode: tok/s)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("o small preset, s HF checkpoint; blue prefill-heavy, orange decode-heavy")
    save_png(fig, out / "quantized_comm.png")


def write(rows: list[dict[str, Any]], out: Path) -> Path:
    parts = [
        "# Quantized communication: accuracy against bytes and speed",
        "",
        "Made by `python -m experiments.quantized_comm` (TP 2, gloo on this 2-core host, "
        "3 repeats: medians with their order-statistic interval, 75% confidence at 3 runs; "
        "ratios take the extremes of both intervals). `wire` is `fmt/block` for the quantized "
        "strategy (one-shot, `min_bytes=0`: every message quantized). Accuracy is against "
        "exact communication on the same ranks and weights, teacher-forced.",
        "",
        *table(rows),
        "",
        "![quantized_comm](quantized_comm.png)",
        "",
    ]
    plot(rows, out)
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.quantized_comm", description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--runs", type=Path, help="runs.json of an earlier study: measure nothing")
    ap.add_argument(
        "--exact-only", action="store_true", help="rerun only the exact baselines' sweeps"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        rows = json.loads(args.runs.read_text())
    else:
        rows = measure(SWEEPS, args.exact_only)
        (args.out / "runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(write(rows, args.out).read_text())


if __name__ == "__main__":
    main()
