"""A run's result: the ranks' measurements combined into what ``results.json`` holds.

:func:`summarize` combines one measured run's per-rank readings (times: the max over ranks,
the slowest rank sets TP's pace; counters: rank 0's), :func:`combine` the repeats (medians and
intervals), :func:`flat_summary` flattens a result for loggers and trackers. Its headline
columns are :data:`framework.run.columns.HEADLINE`.
"""

from __future__ import annotations

from typing import Any

import torch

from framework.comm.registry import strategy_label
from framework.run.spec import RunSpec, checkpoint_dir, resolve_backend, resolve_device
from framework.run.spread import median_interval


def _per_op(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    out = per_rank[0]["per_op"]
    for phase, ops in out.items():
        for op, counters in ops.items():
            counters["wait_s"] = max(r["per_op"][phase][op]["wait_s"] for r in per_rank)
    return out


def _texts(spec: RunSpec, tokens: list[list[int]]) -> dict[str, Any]:
    """Text prompts: the prompts and the decoded continuations beside the token ids."""
    if not spec.workload.text:
        return {}
    from framework.run.text import decode

    return {
        "text": list(spec.workload.text),
        "continuations": decode(checkpoint_dir(spec.model), tokens),
    }


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q / 100).item())


def summarize(spec: RunSpec, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine ranks' measurements: times are the max over ranks, counters rank 0's."""
    w = spec.workload
    r0 = per_rank[0]
    steps = len(r0["itl_s"])
    itl = [max(r["itl_s"][i] for r in per_rank) for i in range(steps)]
    ttft = max(r["ttft_s"] for r in per_rank)
    decode_s = max(r["decode_s"] for r in per_rank)
    batch = len(r0["tokens"])
    exposed = max(r["decode"]["wait_s"] for r in per_rank)
    per_step = max(steps, 1)
    d = r0["decode"]
    return {
        "status": "ok",
        "strategy": spec.strategy,
        "exact": r0["exact"],  # the communicator as built: sums as the library does, to rounding
        "inner": spec.strategy_options.get("inner"),
        "strategy_options": dict(spec.strategy_options),
        "world_size": len(per_rank),
        "backend": resolve_backend(spec.parallel),
        "device": resolve_device(spec.parallel),
        "cuda_graphs": spec.parallel.cuda_graphs,
        "graph_capture_s": max(r["graph_capture_s"] for r in per_rank),
        "model": spec.model.checkpoint or spec.model.preset,  # a path, or the preset's name
        "num_layers": spec.model.num_layers,
        "batch_size": batch,
        "micro_batches": w.micro_batches,
        "background_load": w.background_load,
        "new_tokens": w.new_tokens,
        "ttft_s": ttft,
        "prompt_tokens": r0["prompt_tokens"],
        "prompt_len": r0["prompt_len"],  # the longest prompt (the others are left-padded)
        "prefill_tokens_per_s": r0["prompt_tokens"] / ttft if ttft else float("nan"),
        "itl_p50_s": _percentile(itl, 50),
        "itl_p90_s": _percentile(itl, 90),
        "itl_p99_s": _percentile(itl, 99),
        "decode_tokens_per_s": batch * steps / decode_s if decode_s > 0 else float("nan"),
        # per decode step (one new token for each sequence of the batch)
        "allreduce_calls_per_token": d["calls"] / per_step,
        "collectives_per_token": d["collectives"] / per_step,
        "bytes_per_token": d["bytes"] / per_step,
        "wire_bytes_per_token": d["wire_bytes"] / per_step,
        # on CUDA the host is not blocked while the device waits: host time only
        "exposed_comm_s": exposed,
        "exposed_comm_is_host_time": resolve_device(spec.parallel) == "cuda",
        "exposed_comm_share": exposed / decode_s if decode_s > 0 else float("nan"),
        "prefill_exposed_comm_s": max(r["prefill_wait_s"] for r in per_rank),
        "buffer_allocs": r0["buffer_allocs"],
        "buffer_reuses": r0["buffer_reuses"],
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in per_rank),
        "rss_growth": max(r["rss_growth"] for r in per_rank),
        "pending_max": max(r["pending_max"] for r in per_rank),
        "comm_extra": r0["extra"],
        # per op and phase: calls, collectives, bytes, wire_bytes (rank 0), wait_s (max
        # over ranks): where sequence parallelism moves the traffic
        "per_op": _per_op(per_rank),
        "sequence_parallel": spec.parallel.sequence_parallel,
        "sp_min_tokens": spec.parallel.sp_min_tokens,
        "sp_steps": r0["sp_steps"],
        "sp_padded_tokens": r0["sp_padded_tokens"],
        "tokens": r0["tokens"],
        **_texts(spec, r0["tokens"]),
        "tokens_agree_across_ranks": all(r["tokens"] == r0["tokens"] for r in per_rank),
        "numerics": r0.get("numerics"),
    }


# the timed metrics: medians over repeats, each with its spread
TIMED = (
    "ttft_s",
    "prefill_tokens_per_s",
    "itl_p50_s",
    "itl_p90_s",
    "itl_p99_s",
    "decode_tokens_per_s",
    "exposed_comm_s",
    "exposed_comm_share",
    "prefill_exposed_comm_s",
)


def combine(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the repeats' summaries: the first's counters and tokens (they do not
    change between repeats: ``tokens_agree_across_repeats`` says so), each timed metric's
    median, and ``spread[metric]``: median, interval and every run."""
    out = dict(repeats[0])
    out["repeats"] = len(repeats)
    out["tokens_agree_across_repeats"] = all(r["tokens"] == out["tokens"] for r in repeats)
    out["spread"] = {k: median_interval([r[k] for r in repeats]) for k in TIMED}
    for k in TIMED:
        out[k] = out["spread"][k]["median"]
    return out


def compared(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The result of a job that measured several strategies (``RunSpec.compare``): each one's
    result in ``runs``, the job's own first, each marked ``same_tokens_as_exact`` against the
    first exact strategy's tokens (the reference text). The headline is the job's own."""
    reference = next((r for r in runs if r["exact"]), None)
    for r in runs:
        same = None if reference is None else r["tokens"] == reference["tokens"]
        r["same_tokens_as_exact"] = same
    return {
        **{k: runs[0][k] for k in ("status", "strategy", "world_size", "decode_tokens_per_s")},
        "compared": [r["strategy"] for r in runs],
        "rounds": runs[0]["repeats"],
        "exact_reference": None if reference is None else reference["strategy"],
        "runs": runs,
    }


def flat_summary(data: dict[str, Any]) -> dict[str, Any]:
    """A result's scalars for a logger or tracker: the numerics block as ``numerics/<key>``
    (accuracy beside bytes and speed) and each repeated metric's interval as
    ``<metric>_lo`` / ``<metric>_hi``."""
    scalar = int | float | str | bool
    flat = {k: v for k, v in data.items() if isinstance(v, scalar)}
    seen: dict[str, int] = {}
    for run in data.get("runs") or []:  # a job that compared strategies: one block each
        label = strategy_label(run["strategy"], run.get("strategy_options") or {})
        seen[label] = seen.get(label, 0) + 1
        label += f"#{seen[label]}" if seen[label] > 1 else ""
        flat.update({f"{label}/{k}": v for k, v in flat_summary(run).items() if k != "strategy"})
    for k, v in (data.get("numerics") or {}).items():
        if isinstance(v, scalar):
            flat[f"numerics/{k}"] = v
    for k, v in ((data.get("numerics") or {}).get("perplexity") or {}).items():
        if isinstance(v, scalar):
            flat[f"numerics/perplexity/{k}"] = v
    for metric, sp in (data.get("spread") or {}).items():
        flat[f"{metric}_lo"], flat[f"{metric}_hi"] = sp["lo"], sp["hi"]
    return flat
