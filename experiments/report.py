"""Gather a sweep's jobs into one table and plots: ``python -m experiments.report <dir>``.

Reads every ``*/results.json`` (infer jobs) and ``*/bench.csv`` (bench jobs) under the sweep
directory, writes ``report.md`` and ``report.csv`` (failed and killed jobs kept and marked, job
directories without a result listed as ``missing``), and draws PNGs
with matplotlib: decode tokens/s, inter-token latency and exposed-communication share per
strategy and world size; all-reduce time and busbw against message size per strategy. Runs by
itself at the end of every multirun through :class:`ReportCallback` (conf: hydra.callbacks).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from framework.run.columns import HEADLINE

# from its perplexity block (workload.eval_text): report columns ppl_<key>
PPL_COLS = ("text", "tokens", "exact", "strategy", "ratio", "ratio_lo", "ratio_hi")
PPL_COLS += ("kl_per_token", "top1_agreement")
INFER_COLS = [
    "job",
    "status",
    "options",
    "repeats",
    *(c for c in HEADLINE if c != "inner"),  # the options column says the inner algorithm
    "agreement",
    "kl_mean",
    "logit_max_abs_err",
    "wire_bytes_vs_exact",
    *(f"ppl_{k}" for k in PPL_COLS),
    "same_tokens_as_exact",
    "continuation",
    "error",
]
# the columns report.md shows (those with a value in some row); report.csv has all of INFER_COLS
SHOWN_COLS = [
    "job",
    "status",
    "strategy",
    "options",
    "world_size",
    "micro_batches",
    "repeats",
    "decode_tokens_per_s",
    "ttft_s",
    "itl_p50_s",
    "exposed_comm_share",
    "collectives_per_token",
    "agreement",
    "kl_mean",
    "ppl_ratio",
    "ppl_kl_per_token",
    "same_tokens_as_exact",
    "error",
]
# from a run's numerics block (workload.reference=exact)
NUMERICS_COLS = ("agreement", "kl_mean", "logit_max_abs_err", "wire_bytes_vs_exact")
# strategy options that say nothing about what ran
_QUIET_OPTIONS = {"timeout_s", "validate"}
BENCH_COLS = [
    "job",
    "strategy",
    "world_size",
    "mode",
    "size",
    "count",
    "type",
    "time_us",
    "algbw_gbps",
    "busbw_gbps",
    "wrong",
]


def _job_name(path: Path, root: Path) -> str:
    return str(path.parent.relative_to(root)) or "."


def _results(root: Path, name: str) -> list[Path]:
    """Job result files, not the copies W&B keeps inside its run directories."""
    files = [f for f in root.rglob(name) if "wandb" not in f.relative_to(root).parts]
    # job directories are numbered: 2 before 10
    return sorted(
        files, key=lambda f: [int(p) if p.isdigit() else p for p in f.relative_to(root).parts]
    )


def collect(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    infer, bench = [], []
    for f in _results(root, "results.json"):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError) as e:  # torn, or not a file (a directory in its place)
            r = {"status": "failed", "error": f"unreadable results.json: {e}"}
        if r.get("job_type") == "bench":
            if r.get("status") in ("failed", "killed"):
                bench.append(
                    {
                        "job": _job_name(f, root),
                        "strategy": r.get("strategy"),
                        "world_size": r.get("world_size"),
                        "mode": r["status"],
                    }
                )
            continue
        for run in r.get("runs") or [r]:  # a job that compared strategies holds several
            infer.append(infer_row(run, _job_name(f, root)))
    for f in _results(root, "bench.csv"):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                bench.append({"job": _job_name(f, root), **row})
    for job in missing_jobs(root):  # killed without a chance to write (SIGKILL, power loss)
        name = _job_name(job / "results.json", root)
        if _job_type(job) == "bench":
            bench.append({"job": name, "mode": "missing"})
        else:
            infer.append(
                {
                    "job": name,
                    "status": "missing",
                    "error": "no results.json: the job was killed or is still running",
                }
            )
    return infer, bench


def infer_row(r: dict[str, Any], job: str) -> dict[str, Any]:
    """One infer job's table row: the columns, the numerics, and the spread of repeats."""
    row = {"job": job, **{c: r.get(c) for c in INFER_COLS[1:]}}
    row["options"] = options_label(r.get("strategy_options") or {})
    row.update({c: (r.get("numerics") or {}).get(c) for c in NUMERICS_COLS})
    row["spread"] = r.get("spread") or {}
    row["exact"] = r.get("exact")
    ppl = (r.get("numerics") or {}).get("perplexity") or {}
    row.update({f"ppl_{k}": ppl.get(k) for k in PPL_COLS})
    row["sha256"] = ppl.get("sha256")
    row["numerics"] = r.get("numerics") or {}
    row["strategy_options"] = r.get("strategy_options") or {}
    row["comm_extra"] = r.get("comm_extra") or {}
    row["text"] = r.get("text") or []
    row["continuations"] = r.get("continuations") or []
    row["continuation"] = " / ".join(row["continuations"])
    row["model"], row["prompt_len"] = r.get("model"), r.get("prompt_len")
    row["sequence_parallel"] = r.get("sequence_parallel")
    row["sp_padded_tokens"] = r.get("sp_padded_tokens")
    row["per_op"] = r.get("per_op") or {}
    return row


def options_label(options: dict[str, Any]) -> str:
    """The options that set what ran, compact: ``fmt=int4 block=32 inner=shm``."""
    return " ".join(
        f"{k}={v}" for k, v in sorted(options.items()) if k not in _QUIET_OPTIONS and v is not None
    )


def _job_type(job: Path) -> str:
    """The entry point that ran a Hydra job (``hydra.job.name``: infer or bench)."""
    try:
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        return str(hydra["job"]["name"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):  # torn by the kill
        return "infer"


def missing_jobs(root: Path) -> list[Path]:
    """Hydra job directories (they hold ``.hydra/``) that have no ``results.json``."""
    jobs = {d.parent for d in root.rglob(".hydra") if "wandb" not in d.relative_to(root).parts}
    return sorted(j for j in jobs if not (j / "results.json").exists())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "/").replace("\n", " ")[:80]


def _cell(row: dict[str, Any], col: str) -> str:
    """A value; a median over repeats shows its interval: ``12.3 [11.9, 13.0]``, and so
    does the perplexity ratio (a bootstrap interval)."""
    if col == "ppl_ratio" and row.get("ppl_ratio") is not None:
        return f"{row['ppl_ratio']:.4f} [{row['ppl_ratio_lo']:.4f}, {row['ppl_ratio_hi']:.4f}]"
    spread = (row.get("spread") or {}).get(col)
    if spread and len(spread.get("runs", ())) > 1:
        return f"{spread['median']:.4g} [{spread['lo']:.4g}, {spread['hi']:.4g}]"
    return _fmt(row.get(col))


def markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file beside it, then a rename): a write
    that fails (a full disk, a file-size limit) leaves the previous file or none, not a torn
    one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None:  # name the plot, not the temporary file or nothing
            e.filename = str(path)
        raise
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _plot_infer(rows: list[dict[str, Any]], root: Path) -> list[Path]:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    strategies = sorted({_label(r) for r in ok})  # a strategy with its options: one bar each
    sizes = sorted({r["world_size"] for r in ok})
    paths = []
    for key, label in [
        ("decode_tokens_per_s", "decode tokens/s"),
        ("itl_p50_s", "inter-token latency p50 (s)"),
        ("exposed_comm_share", "exposed communication share of decode"),
    ]:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(strategies)), 4))
        width = 0.8 / len(sizes)
        for i, ws in enumerate(sizes):
            picked = [
                next(
                    (
                        r
                        for r in ok
                        if _label(r) == s and r["world_size"] == ws and r[key] is not None
                    ),
                    None,
                )
                for s in strategies
            ]
            vals = [r[key] if r else 0.0 for r in picked]
            xs = [j + i * width for j in range(len(strategies))]
            ax.bar(xs, vals, width, label=f"TP={ws}")
            # error bars: the interval of the median over repeats, only where there are
            # several (a single run has no interval: no bar, not a zero-height one)
            spans = [(r.get("spread") or {}).get(key) if r else None for r in picked]
            bars = [
                (x, v, sp)
                for x, v, sp in zip(xs, vals, spans)
                if sp and len(sp.get("runs", ())) > 1
            ]
            if bars:
                ax.errorbar(
                    [b[0] for b in bars],
                    [b[1] for b in bars],
                    yerr=[[v - sp["lo"] for _, v, sp in bars], [sp["hi"] - v for _, v, sp in bars]],
                    fmt="none",
                    ecolor="black",
                    capsize=3,
                )
        ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(strategies))])
        ax.set_xticklabels(strategies, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend()
        paths.append(save_png(fig, root / f"infer_{key}.png"))
    numerics = [r for r in ok if r.get("kl_mean") is not None and r.get("wire_bytes_vs_exact")]
    if numerics:
        paths.append(plot_numerics(numerics, root))
    return paths


def _label(row: dict[str, Any]) -> str:
    return f"{row['strategy']} {row.get('options') or ''}".strip()


def plot_numerics(rows: list[dict[str, Any]], root: Path) -> Path:
    """Accuracy against bytes and speed: KL to the exact run and decode tokens/s, each
    against bytes on the wire relative to exact, one point per run (labelled)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        label = f"{r['strategy']} {r.get('options') or ''}".strip()
        x = r.get("wire_bytes_vs_exact") or float("nan")
        axes[0].scatter(x, max(r["kl_mean"], 1e-12))
        axes[0].annotate(label, (x, max(r["kl_mean"], 1e-12)), fontsize=6)
        axes[1].scatter(x, r["decode_tokens_per_s"])
        axes[1].annotate(label, (x, r["decode_tokens_per_s"]), fontsize=6)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean KL to the exact run (nats; 1e-12 = identical)")
    axes[1].set_ylabel("decode tokens/s")
    for ax in axes:
        ax.set_xlabel("bytes on the wire / exact")
        ax.grid(True, alpha=0.3)
    return save_png(fig, root / "infer_numerics.png")


def plot_bench(rows: list[dict[str, Any]], root: Path) -> list[Path]:
    plt = pyplot()
    ok = [r for r in rows if r.get("mode") != "failed" and r.get("time_us")]
    if not ok:
        return []
    paths = []
    for key, label in [("time_us", "all-reduce time (us)"), ("busbw_gbps", "busbw (GB/s)")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for series in sorted({(r["strategy"], r["world_size"], r["mode"]) for r in ok}):
            pts = sorted(
                (int(r["size"]), float(r[key]))
                for r in ok
                if (r["strategy"], r["world_size"], r["mode"]) == series
            )
            name = f"{series[0]} TP={series[1]}" + (
                "" if series[2] == "single" else f" ({series[2]})"
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        paths.append(save_png(fig, root / f"bench_{key}.png"))
    return paths


def plot_job_steps(job_dir: str | Path, title: str) -> Path | None:
    """One job's inter-token latency per decode step (from the Fabric CSV logger)."""
    plt = pyplot()
    path = Path(job_dir) / "steps" / "metrics.csv"
    if not path.exists():
        return None
    with open(path, newline="") as f:
        pts = [
            (int(r["step"]), float(r["itl_s"]) * 1e3) for r in csv.DictReader(f) if r.get("itl_s")
        ]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
    ax.set_xlabel("decode step")
    ax.set_ylabel("inter-token latency (ms, rank 0)")
    ax.set_title(title)
    return save_png(fig, Path(job_dir) / "itl_per_step.png")


def _section(
    root: Path,
    title: str,
    rows: list[dict[str, Any]],
    cols: list[str],
    plot,
    csv_name: str,
    shown: list[str] | None = None,
) -> list[str]:
    """A markdown table (``shown``, default every column) plus plots for ``rows``; every
    column of the rows goes to ``csv_name``."""
    with open(root / csv_name, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return [
        f"## {title}",
        "",
        markdown(rows, shown or cols),
        "",
        *[f"![{p.stem}]({p.name})" for p in plot(rows, root)],
        "",
    ]


def _text(s: str) -> str:
    """Generated text in a table cell: code, newlines and tabs shown, not acted on."""
    shown = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return "`" + shown.replace("`", "'").replace("|", "/") + "`"


def text_section(rows: list[dict[str, Any]]) -> list[str]:
    """Each prompt, the exact continuation, and every strategy's beside it: those that
    differ from the exact one marked. Only for runs with text prompts."""
    runs = [r for r in rows if r.get("status") == "ok" and r.get("continuations")]
    out = []
    for job in dict.fromkeys(r["job"] for r in runs):  # each job against its own exact run
        mine = [r for r in runs if r["job"] == job]
        exact = next((r for r in mine if r.get("exact")), None)
        if exact is None:
            continue
        where = f" (job {job}, TP {exact['world_size']})" if job != "." else ""
        for i, prompt in enumerate(exact["text"]):
            out += [f"Prompt {i + 1}{where}: {_text(prompt)}", ""]
            out += ["| strategy | | continuation |", "|---|---|---|"]
            for r in mine:
                text = r["continuations"][i] if i < len(r["continuations"]) else ""
                mark = "same" if text == exact["continuations"][i] else "**differs**"
                if r is exact:
                    mark = "exact"
                out.append(f"| {_label(r)} | {mark} | {_text(text)} |")
            out.append("")
    return ["## Text", "", *out] if out else []


def write_report(root: str | Path) -> Path:
    root = Path(root)
    infer, bench = collect(root)
    parts = [f"# commlab report: {root}", ""]
    if infer:
        shown = [c for c in SHOWN_COLS if any(r.get(c) not in (None, "") for r in infer)]
        parts += _section(root, "TP inference", infer, INFER_COLS, _plot_infer, "report.csv", shown)
        parts += text_section(infer)
    if bench:
        parts += _section(
            root, "All-reduce benchmark", bench, BENCH_COLS, plot_bench, "bench_report.csv"
        )
    if not (infer or bench):
        parts.append("No results.json or bench.csv found.")
    out = root / "report.md"
    out.write_text("\n".join(parts) + "\n")
    return out


class ReportCallback(Callback):
    """Hydra callback: keep the sweep's report current after every job, print it at the end.

    Updating after each job (not only at the end) matters: when a job fails, Hydra's basic
    sweeper raises after the batch and ``on_multirun_end`` never runs, yet the report of the
    jobs that did finish (and which failed, and why) is exactly what the researcher needs.
    """

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().mode.name == "MULTIRUN":
            write_report(config.hydra.sweep.dir)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        path = write_report(config.hydra.sweep.dir)
        print(path.read_text().split("![")[0], flush=True)
        print(f"report: {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="commlab-report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("sweep_dir")
    ap.add_argument("--view", help="a study's view (experiments.views.VIEWS) instead")
    ap.add_argument("--out", help="where the view writes (default: the sweep directory)")
    args = ap.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    if args.view:
        from experiments.views import get_view

        infer, bench = collect(Path(args.sweep_dir))
        for p in get_view(args.view)(infer + bench, Path(args.out or args.sweep_dir)):
            print(f"wrote {p}")
        return 0
    path = write_report(args.sweep_dir)
    print(path.read_text().split("![")[0])
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
