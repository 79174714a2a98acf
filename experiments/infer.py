"""TP inference with a swappable communicator: ``python -m experiments.infer [overrides]``.

Examples::

    python -m experiments.infer strategy=bucketed parallel.world_size=4 workload.micro_batches=2
    python -m experiments.infer -m strategy=naive,tree parallel.world_size=2,4
    python -m experiments.infer experiment=compare   # every strategy, interleaved rounds

Each job writes ``results.json`` (see framework.run.results.summarize) in its run directory and
returns decode tokens/s, the objective a Hydra sweeper (Optuna) maximises.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from lightning.fabric.loggers import CSVLogger
from omegaconf import DictConfig

import experiments.configs  # noqa: F401  (registers the structured configs)
from experiments.common import run_job, run_spec
from experiments.report import plot_job_steps, write_report
from framework.comm.env import is_rank_zero
from framework.run.columns import HEADLINE
from framework.run.runner import launch


@hydra.main(version_base="1.3", config_path="pkg://commlab_conf", config_name="infer")
def main(cfg: DictConfig) -> float:
    def body(out_dir: str, tracker) -> dict:
        spec = run_spec(cfg, out_dir)
        results = launch(
            spec, loggers=[CSVLogger(out_dir, name="steps", version="")], progress=cfg.progress
        )
        if is_rank_zero():
            for run in results.get("runs") or [results]:
                print("  ".join(f"{k}={_fmt(run.get(k))}" for k in HEADLINE), flush=True)
            if not results.get("runs"):  # a comparison prints its text in the report
                for prompt, text in zip(
                    results.get("text") or [], results.get("continuations") or []
                ):
                    print(f"{prompt!r} -> {text!r}", flush=True)
        return results

    def plot_steps(out_dir: str, tracker, results: dict) -> None:
        png = plot_job_steps(out_dir, f"{cfg.strategy.name}, TP={cfg.parallel.world_size}")
        if png is not None:
            tracker.attach(png)

    def report(out_dir: str, tracker, results: dict) -> None:
        """A job that compared strategies is its own sweep: its report, printed."""
        if results.get("runs") and is_rank_zero():
            path = write_report(out_dir)
            print(path.read_text().split("![")[0] + "\n".join(text_section_of(path)), flush=True)
            print(f"report: {path}", flush=True)
            tracker.attach(path)

    job = run_job(cfg, "infer", body, "results.json", after=[plot_steps, report])
    return job["decode_tokens_per_s"]


def text_section_of(report: Path) -> list[str]:
    text = report.read_text()
    return [text[text.index("## Text") :]] if "## Text" in text else []


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
