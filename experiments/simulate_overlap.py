"""The overlap part of ``python -m experiments.simulate``: a TP layer's op pairs on GPU presets.

A TP 8 layer of Llama-3-8B and -70B (:mod:`framework.costmodel.tp_layer`) composed, chunked
(c = 2, 4, 8), as async-TP, token split and with the fused epilogue, for prefill of 128-8,192
tokens and decode of batch 1-64, on one NVLink node (``h100_nvlink``) and split over two
InfiniBand nodes of 4 (``h100_ib``; no published table covers that layout, so it is an
extrapolation). Writes ``overlap.csv`` and ``overlap.md``: per size the speed-up of each
schedule over composed, the size below which each stops paying, and the published figures
(``results/published/overlap_speedups.csv``) beside the predictions. Model predictions from
published constants and stated assumptions (``conf/topology``), not measurements.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

from experiments.simulate import MODELS, size_label
from framework.costmodel import DecodeShape, Topology, decode_step, load_topology
from framework.costmodel.overlap import epilogue_time
from framework.costmodel.tp_layer import (
    LayerShape,
    layer_compute,
    schedules,
    tp_algorithm,
    tp_allreduce_time,
)
from framework.model import get_config

PREFILL = [128, 256, 512, 1024, 2048, 4096, 8192]
DECODE = [1, 2, 4, 8, 16, 32, 64]
DECODE_CONTEXT = 1024  # cached tokens per sequence in decode (assumed)
TP = 8
# case -> (preset, ranks per node): one NVLink node; TP 8 split over 2 InfiniBand nodes of 4
OVERLAP_CASES = {"h100_nvlink": ("h100_nvlink", 8), "h100_ib, 2 nodes x 4": ("h100_ib", 4)}
SCHEDULES = ["chunked_2", "chunked_4", "chunked_8", "async_tp", "token_split", "fused"]
PUBLISHED_OVERLAP = Path(__file__).resolve().parents[1] / "results/published/overlap_speedups.csv"


def layer_shape(model: str) -> LayerShape:
    c = get_config(model)
    return LayerShape(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim)


def case_topology(case: str) -> Topology:
    name, g = OVERLAP_CASES[case]
    topo = load_topology(name)
    return dataclasses.replace(topo, ranks_per_node=g, nics_per_node=min(g, topo.nics_per_node))


def overlap_rows() -> list[dict[str, Any]]:
    """Per case, model and size: the composed layer and step, each schedule's speed-up."""
    rows = []
    for case in OVERLAP_CASES:
        topo = case_topology(case)
        for model in MODELS:
            s = layer_shape(model)
            for phase, sizes in (("decode", DECODE), ("prefill", PREFILL)):
                ctx = DECODE_CONTEXT if phase == "decode" else 0
                for tokens in sizes:
                    t = schedules(topo, s, tokens, TP, context=ctx)
                    n = tokens * s.hidden * s.dtype_bytes
                    step = _composed_step(topo, s, model, tokens, ctx)
                    best_c = min((2, 4, 8), key=lambda k: t[f"chunked_{k}"])
                    # token split needs two tokens: nothing to split in a batch of one
                    speedup = {k: t["composed"] / t[k] for k in SCHEDULES if t[k] < math.inf}
                    rows.append(
                        {
                            "case": case,
                            "model": model,
                            "phase": phase,
                            "tokens": tokens,
                            "message_bytes": n,
                            "allreduce": tp_algorithm(topo, TP, n),
                            "layer_us": round(t["composed"] * 1e6, 2),
                            "step_ms": round(step * 1e3, 3),
                            **{
                                k: round(speedup[k], 3) if k in speedup else None for k in SCHEDULES
                            },
                            "best_c": best_c,
                            "chunked_best": round(speedup[f"chunked_{best_c}"], 3),
                        }
                    )
    return rows


def _composed_step(topo: Topology, s: LayerShape, model: str, tokens: int, ctx: int) -> float:
    """The composed step through :func:`decode_step`: compute + 2 all-reduces per layer."""
    c, layers = layer_compute(topo, s, tokens, TP, context=ctx), get_config(model).num_layers
    n = tokens * s.hidden * s.dtype_bytes
    per_layer = sum(c.values()) + len(c) * topo.kernel_s + 2 * epilogue_time(topo, n, False)
    shape = DecodeShape(s.hidden, layers, get_config(model).num_params, tokens)
    ar = tp_allreduce_time(topo, TP, n)
    return decode_step(topo, "naive", TP, shape, compute_s=layers * per_layer, allreduce_s=ar)[
        "itl_s"
    ]


def stops_paying(rows: list[dict[str, Any]], key: str) -> str:
    """Prefill sizes where ``key`` beats composed: the size below which it stops paying, or
    the sizes where it pays when they are not all the larger ones."""
    ratio = {r["tokens"]: r[key] for r in rows if r["phase"] == "prefill"}
    pays = [t for t in PREFILL if ratio[t] >= 1.0]
    best = max(ratio.values())
    if not pays:
        return f"never pays up to {PREFILL[-1]} tokens (best {best:.2f}x)"
    if pays == PREFILL[PREFILL.index(pays[0]) :]:
        return f"stops paying below {pays[0]} tokens (best {best:.2f}x)"
    return f"pays at {', '.join(map(str, pays))} tokens only (best {best:.2f}x)"


def fused_op(topo: Topology, p: int, tokens: int, hidden: int) -> tuple[float, float]:
    """(composed, fused) seconds of all-reduce + residual add + RMSNorm alone."""
    n = tokens * hidden * 2
    ar = tp_allreduce_time(topo, p, n)
    return ar + epilogue_time(topo, n, False), ar + epilogue_time(topo, n, True)


def published_beside(rows: list[dict[str, Any]]) -> list[str]:
    """The published figures, each with the model's nearest prediction and why they differ."""
    nv = [r for r in rows if r["case"] == "h100_nvlink"]

    def at(model: str, phase: str, tokens: int, key: str) -> float:
        return next(
            r[key] for r in nv if (r["model"], r["phase"], r["tokens"]) == (model, phase, tokens)
        )

    with open(PUBLISHED_OVERLAP) as f:
        pub = list(csv.DictReader(f))
    lines = [
        "| source | setting | published | model (h100_nvlink, TP 8 unless stated) "
        "| why they differ |",
        "|---|---|---|---|---|",
    ]
    nvlink = load_topology("h100_nvlink")
    for r in pub:
        src, setting, x = r["source_id"], r["setting"], float(r["speedup"])
        if src == "VLLM_PR_22086":
            tokens = int(setting.split("seq_len ")[1])
            comp, fused = fused_op(nvlink, 2, tokens, 8192)
            model = (
                f"TP 2, same shape: composed {comp * 1e3:.3f} ms (published "
                f"{float(r['baseline']):.3f}), fused {comp / fused:.2f}x"
            )
            why = (
                "the model gives the fused kernel the same all-reduce; FlashInfer's fused "
                "one-shot was slower than vLLM's all-reduce there, hence vLLM's size gate"
            )
        elif src == "VLLM_PR_48757":
            model = ", ".join(
                f"{m} decode batch 32: {at(m, 'decode', 32, 'fused'):.2f}x" for m in MODELS
            )
            why = "Qwen3-32B FP8 (hidden 5120) sits between the two; fp8 shrinks the compute"
        elif src == "TORCHTITAN_ASYNC_TP":
            m = "llama3-70b" if "70B" in setting else "llama3-8b"
            model = f"{m} async_tp at 8,192 tokens: {at(m, 'prefill', 8192, 'async_tp'):.2f}x"
            why = "training (forward and backward), H100 96 GB at 500 W; here one forward"
        elif src == "FLUX":
            phase, tokens = ("decode", 64) if "decode" in setting else ("prefill", 8192)
            model = ", ".join(
                f"{m} {phase} {tokens}: chunked {at(m, phase, tokens, 'chunked_best'):.2f}x"
                for m in MODELS
            )
            why = (
                "per-tile fusion pays no start-up per chunk; its best case is over GPU "
                "generations and interconnects, not H100 NVLink"
            )
        else:  # TokenWeave
            model = ", ".join(
                f"{m} 1,024 tokens: {at(m, 'prefill', 1024, 'token_split'):.2f}x" for m in MODELS
            )
            why = (
                "the model's all-reduces (fitted NCCL and two-shot) are slower than "
                "TokenWeave's multimem kernel, leaving more to hide; no wave-quantization loss"
            )
        lines.append(f"| {src} | {setting} | {x:.2f}x | {model} | {why} |")
    return lines


def write_overlap(out: Path) -> list[str]:
    rows = overlap_rows()
    with open(out / "overlap.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    notes = [
        f"{case}, {m}: chunked (best c) {stops_paying(rs, 'chunked_best')}; async-TP "
        f"{stops_paying(rs, 'async_tp')}; token split {stops_paying(rs, 'token_split')}"
        for case in OVERLAP_CASES
        for m in MODELS
        if (rs := [r for r in rows if r["case"] == case and r["model"] == m])
    ]
    lines = [
        "# A TP 8 layer's op pairs: composed, chunked, async-TP, token split, fused epilogue",
        "",
        "Written by `python -m experiments.simulate` from `framework.costmodel.tp_layer` (the",
        "formulas: `framework/costmodel/overlap.py`). Model predictions, not measurements.",
        f"Llama-3 bf16, TP {TP}; decode: one token per sequence, {DECODE_CONTEXT} cached tokens.",
        "Speed-ups are composed / schedule per layer (> 1: faster). `step` is the composed",
        "decode step or prefill forward, layers x layer (LM head and embedding left out).",
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Published figures beside the predictions",
        "",
        *published_beside(rows),
        "",
        "| case | model | phase | tokens | message | all-reduce | layer (us) | step (ms) | "
        "c=2 | c=4 | c=8 | best c | async-TP | token split | fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['model']} | {r['phase']} | {r['tokens']} | "
        f"{size_label(r['message_bytes'])} | {r['allreduce']} | {r['layer_us']:.1f} | "
        f"{r['step_ms']:.2f} | {r['chunked_2']:.2f} | {r['chunked_4']:.2f} | "
        f"{r['chunked_8']:.2f} | {r['best_c']} | {r['async_tp']:.2f} | "
        f"{'n/a' if r['token_split'] is None else format(r['token_split'], '.2f')} | "
        f"{r['fused']:.2f} |"
        for r in rows
    ]
    (out / "overlap.md").write_text("\n".join(lines) + "\n")
    return notes
