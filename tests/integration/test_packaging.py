"""A non-editable install runs the main job from another directory, configs included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.full
def test_wheel_install_runs_infer_from_another_directory(tmp_path: Path) -> None:
    # A fresh environment with commlab installed from a wheel, non-editable; the heavy
    # dependencies (torch, hydra, lightning) come from this environment through a .pth
    # path entry, which does not run this environment's editable-install hook.
    env_dir = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120
    )
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [py, "-c", "import framework, commlab_conf as c; print(framework.__file__, c.__path__[0])"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(p.startswith(site) for p in where), where  # the installed copy, not the tree
    assert not (Path(site) / "conf").exists()  # no generic top-level package name taken
    run = work / "run"
    r = subprocess.run(
        [
            env_dir / "bin" / "commlab-infer",
            "model=tiny",
            "workload.new_tokens=2",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={run}",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "ok" and res["world_size"] == 2
