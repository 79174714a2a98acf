"""The fusion-and-overlap study's view: prefill and decode with fused and overlapped ops
against the plain collectives, per model, TP size and prompt length
(from ``experiment=fusion_overlap``).

Per point (one model, TP size and prompt length; one job per seed, each comparing the
strategies in interleaved rounds): every strategy's TTFT, decode ITL and exposed communication
(prefill: time blocked in the communicator during prefill / TTFT; decode: the run's
``exposed_comm_share``), medians over every round of every job with their intervals; each
against ``naive`` as a ratio with a conservative interval (both intervals' extremes), and the
share of naive's prefill exposed communication that each strategy removed. The verdict names
the fastest prefill per point only where its ratio interval excludes 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.report import markdown, pyplot, save_png
from framework.run.spread import median_interval, ratio_interval

STRATEGIES = ("naive", "shm", "overlap", "token_split")
COLS = [
    "model",
    "world_size",
    "prompt_len",
    "strategy",
    "ttft_ms",
    "ttft_vs_naive",
    "prefill_exposed",
    "exposed_removed",
    "itl_ms",
    "itl_vs_naive",
    "decode_exposed",
    "jobs",
    "same_tokens_as_exact",
]


def _runs(row: dict[str, Any], metric: str) -> list[float]:
    """Every round's reading of ``metric`` in one job (the median alone if it kept none)."""
    runs = (row.get("spread") or {}).get(metric, {}).get("runs") or [row.get(metric)]
    return [x for x in runs if x is not None]


def _span(rows: list[dict[str, Any]], metric: str, scale: float = 1.0) -> dict[str, Any]:
    """Median and interval over every round of every job (seed) of a point."""
    return median_interval([x * scale for r in rows for x in _runs(r, metric)])


def _fmt(sp: dict[str, Any], digits: str = ".3g") -> str:
    return f"{sp['median']:{digits}} [{sp['lo']:{digits}}, {sp['hi']:{digits}}]"


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    """b / a: above 1 means ``a`` (the strategy) is faster than ``b`` (naive)."""
    r, lo, hi = ratio_interval(b, a)
    return f"{r:.2f} [{lo:.2f}, {hi:.2f}]"


def _prefill_share(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round of every job: prefill exposed communication / TTFT."""
    shares = []
    for r in rows:
        pairs = zip(_runs(r, "prefill_exposed_comm_s"), _runs(r, "ttft_s"), strict=False)
        shares += [w / t for w, t in pairs if t]
    return median_interval(shares)


def table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The study's rows (one per point and strategy) and a verdict line per point."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("strategy") in STRATEGIES]
    jobs: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in ok:
        point = jobs.setdefault((r["model"], r["world_size"], r["prompt_len"]), {})
        point.setdefault(r["strategy"], []).append(r)
    out, verdicts = [], []
    for key in sorted(jobs):
        by = jobs[key]
        if "naive" not in by:
            continue
        base = by["naive"]
        base_ttft, base_itl = _span(base, "ttft_s", 1e3), _span(base, "itl_p50_s", 1e3)
        base_wait = _span(base, "prefill_exposed_comm_s", 1e3)
        best, best_ratio = None, 1.0
        for name in STRATEGIES:
            r = by.get(name)
            if not r:
                continue
            ttft, itl = _span(r, "ttft_s", 1e3), _span(r, "itl_p50_s", 1e3)
            wait = _span(r, "prefill_exposed_comm_s", 1e3)
            removed = 1 - wait["median"] / base_wait["median"] if base_wait["median"] else 0.0
            out.append(
                {
                    "model": key[0],
                    "world_size": key[1],
                    "prompt_len": key[2],
                    "strategy": name,
                    "ttft_ms": _fmt(ttft),
                    "ttft_vs_naive": _ratio(ttft, base_ttft),
                    "prefill_exposed": _fmt(_prefill_share(r), ".2f"),
                    "exposed_removed": f"{removed:+.0%}" if name != "naive" else "",
                    "itl_ms": _fmt(itl),
                    "itl_vs_naive": _ratio(itl, base_itl),
                    "decode_exposed": _fmt(_span(r, "exposed_comm_share"), ".2f"),
                    "jobs": len(r),
                    "same_tokens_as_exact": all(x.get("same_tokens_as_exact") for x in r),
                    "_ttft_ratio": ratio_interval(base_ttft, ttft),
                }
            )
            ratio, lo, _ = ratio_interval(base_ttft, ttft)
            if name != "naive" and lo > 1.0 and ratio > best_ratio:
                best, best_ratio = name, ratio
        where = f"{key[0]}, TP {key[1]}, {key[2]} tokens"
        verdicts.append(
            f"- {where}: "
            + (
                f"**{best}** prefills {best_ratio:.2f}x faster than naive (interval above 1)"
                if best
                else "no strategy's prefill is faster than naive beyond the rounds' noise"
            )
        )
    return out, verdicts


def plot(out_rows: list[dict[str, Any]], path: Path) -> Path:
    """TTFT speed-up against naive per prompt length, one panel per (model, TP size)."""
    plt = pyplot()
    panels = sorted({(r["model"], r["world_size"]) for r in out_rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (model, tp) in zip(axes[0], panels, strict=True):
        for name in STRATEGIES[1:]:
            pts = sorted(
                (r["prompt_len"], r["_ttft_ratio"])
                for r in out_rows
                if (r["model"], r["world_size"], r["strategy"]) == (model, tp, name)
            )
            if not pts:
                continue
            xs = [p for p, _ in pts]
            mid = [q[0] for _, q in pts]
            err = [[q[0] - q[1] for _, q in pts], [q[2] - q[0] for _, q in pts]]
            ax.errorbar(xs, mid, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)  # a speed-up and a slow-down of the same factor look alike
        ax.set_title(f"{model}, TP {tp}")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT speed-up vs naive")
    axes[0][0].legend(fontsize=8)
    return save_png(fig, path)


def view(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    out_rows, verdicts = table(rows)
    if not out_rows:
        raise ValueError("no naive-compared job: run experiment=fusion_overlap")
    out.mkdir(parents=True, exist_ok=True)
    png = plot(out_rows, out / "fusion_overlap.png")
    lines = [
        "# Fused and overlapped TP ops (prefill and decode, CPU ranks over gloo)",
        "",
        "Regenerate: `python -m experiments.infer -m experiment=fusion_overlap`, then",
        "`python -m experiments.report <sweep dir> --view fusion_overlap --out <this folder>`.",
        "",
        "Medians over every interleaved round of every job (`jobs`: one per seed), [interval].",
        "`ttft_vs_naive` and `itl_vs_naive`: naive's time / the strategy's (above 1: faster),",
        "interval from both intervals' extremes. `prefill_exposed`: time blocked in the",
        "communicator during prefill / TTFT. `exposed_removed`: the share of naive's prefill",
        "exposed communication the strategy took away. Prefill runs sequence-parallel",
        "(all_gather_matmul and matmul_reduce_scatter, what overlap chunks); decode runs",
        "all_reduce_add_rmsnorm.",
        "",
        markdown(out_rows, COLS),
        "",
        "## Verdict per size",
        "",
        *verdicts,
        "",
        f"![TTFT speed-up]({png.name})",
        "",
    ]
    md = out / "README.md"
    md.write_text("\n".join(lines))
    return [md, png]
