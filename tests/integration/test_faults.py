"""Failures are fast and named: a killed rank, a raising rank, a desynchronised program.

Each case runs the real entry point and checks the exit code, the message (which rank, why),
the results file (status failed, with the error) and that no rank process is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.comm.registry import parse_strategy

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10


def spawned_ranks() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {
        int(line.split()[0])
        for line in out.splitlines()[1:]
        if "multiprocessing.spawn" in line and "experiments" not in line
    }


def run_fault(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict, float]:
    before = spawned_ranks()
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.infer",
            *overrides,
            f"parallel.timeout_s={TIMEOUT_S}",
            "workload.new_tokens=6",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    assert not (spawned_ranks() - before), "rank processes left behind"
    return r, json.loads((tmp_path / "results.json").read_text()), elapsed


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("commlab-shm-*")}


@pytest.mark.ci
@pytest.mark.full
@pytest.mark.parametrize("strategy", ["naive", "shm", "shm:impl=python"])
def test_killed_rank_fails_fast_and_is_named(tmp_path: Path, strategy: str) -> None:
    segments = shm_files()
    name, opts = parse_strategy(strategy)
    chosen = [f"strategy={name}", *(f"strategy.{k}={v}" for k, v in opts.items())]
    r, res, elapsed = run_fault(tmp_path, *chosen, "fault.kind=kill", "fault.rank=1")
    assert r.returncode != 0
    assert res["status"] == "failed" and "rank 1 (pid" in res["error"]
    assert "was killed by signal SIGKILL" in res["error"]  # our wording, from the signal
    assert "rank 1" in r.stderr
    assert elapsed < 60  # start-up (~20 s here) + detection, far below any hang
    assert shm_files() <= segments, "shared-memory segment left behind"
    assert not list(tmp_path.glob(".results.json.*")), "temporary file left behind"


@pytest.mark.slow
def test_raising_rank_reports_its_exception(tmp_path: Path) -> None:
    r, res, _ = run_fault(tmp_path, "fault.kind=raise", "fault.rank=1")
    assert r.returncode != 0 and res["status"] == "failed"
    assert "rank 1" in res["error"] and "InjectedFault" in res["error"]


@pytest.mark.slow
@pytest.mark.parametrize("validate", [True, False])
def test_desynchronised_ranks_fail_instead_of_hanging(tmp_path: Path, validate: bool) -> None:
    r, res, elapsed = run_fault(
        tmp_path, "fault.kind=extra_allreduce", f"strategy.validate={str(validate).lower()}"
    )
    assert r.returncode != 0 and res["status"] == "failed"
    if validate:  # every rank raises, naming the ranks and sequence numbers
        assert "disagree on the next collective" in res["error"] and "#" in res["error"]
    assert elapsed < 60 + TIMEOUT_S


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_with_hierarchical(tmp_path: Path) -> None:
    """Two torchrun launches on this host act as two nodes of 2 ranks: the node map comes
    from the launcher (LOCAL_WORLD_SIZE), and the tokens equal a single-launch run's."""
    port = free_port()
    common = [
        "-m",
        "experiments.infer",
        "strategy=hierarchical",
        "parallel.world_size=4",
        "workload.new_tokens=4",
        "logger=none",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'nodes'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(n),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *common,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert all(p.returncode == 0 for p in nodes), outs[0][-2000:] + outs[1][-2000:]
    res = json.loads((tmp_path / "nodes" / "results.json").read_text())
    assert res["comm_extra"]["num_nodes"] == 2 and res["comm_extra"]["ranks_per_node"] == 2
    single = tmp_path / "single"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.infer",
            "strategy=naive",
            "parallel.world_size=4",
            "workload.new_tokens=4",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={single}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((single / "results.json").read_text())["tokens"] == res["tokens"]
