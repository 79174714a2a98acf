"""Hydra plugins a researcher reaches for: joblib and submitit launchers, the Optuna sweeper.

Each job must start its own ranks from inside the launcher's worker (a loky process for joblib,
a submitit subprocess), and the Optuna sweep must read the objective infer returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def sweep(tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.infer",
            "-m",
            *overrides,
            "workload.new_tokens=3",
            "logger=none",
            "progress=false",
            f"hydra.sweep.dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def statuses(out: Path) -> list[str]:
    return [json.loads(p.read_text())["status"] for p in sorted(out.glob("*/results.json"))]


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_workers(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = sweep(tmp_path, "strategy=naive,tree", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert statuses(out) == ["ok", "ok"]


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path: Path) -> None:
    """submitit_local exercises the SLURM launcher's code path on one machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = sweep(
        tmp_path,
        "strategy=bucketed",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
    )
    assert statuses(out) == ["ok"]


@pytest.mark.slow
def test_optuna_tunes_bucket_bytes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = sweep(
        tmp_path,
        "experiment=tune_bucket",
        "hydra.sweeper.n_trials=2",
        "workload.batch_size=4",
        "workload.micro_batches=2",
    )
    assert statuses(out) == ["ok", "ok"]
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    jobs = [json.loads(p.read_text()) for p in out.glob("*/results.json")]
    fastest = max(jobs, key=lambda j: j["decode_tokens_per_s"])
    # Optuna's best trial is the job that measured the highest objective, with its options
    assert best["best_value"] == pytest.approx(fastest["decode_tokens_per_s"])
    assert (
        best["best_params"]["strategy.bucket_bytes"]
        == (fastest["strategy_options"]["bucket_bytes"])
    )
