"""experiments.bench end to end: a real sweep on 2 ranks, the many-small-tensors mode, and
configurations refused before any rank is spawned."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, as_torchrun_rank, compose_config, first_only
from hydra.errors import MissingConfigException

from framework.comm.shm import shm_native
from framework.run.spec import ConfigError

COLUMNS = [
    "size",
    "count",
    "type",
    "redop",
    "time_us",
    "p90_us",
    "algbw_gbps",
    "busbw_gbps",
    "wrong",
    "strategy",
    "op",
    "world_size",
    "mode",
    "tensors",
    "baseline",
    "baseline_time_us",
    "speedup",
    "memcpy_gbps",
    "busbw_of_memcpy",
    "round_trip_us",
    "limit_us",
    "of_limit",
]
SMALL = [
    "parallel.world_size=2",
    "bench.min_bytes=1024",
    "bench.max_bytes=16384",
    "bench.factor=4",
    "bench.iters=3",
    "bench.warmup=1",
]


def bench(tmp_path: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench",
            *overrides,
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def check_rows(rows: list[dict[str, str]], strategy: str, mode: str, tensors: int) -> None:
    assert [int(r["size"]) for r in rows] == [1024, 4096, 16384]
    n = 2
    for r in rows:
        size, time_us = int(r["size"]), float(r["time_us"])
        algbw, busbw = float(r["algbw_gbps"]), float(r["busbw_gbps"])
        assert int(r["count"]) == size // 4
        assert (r["type"], r["redop"]) == ("float32", "sum")
        assert int(r["wrong"]) == 0
        assert 0 < time_us <= float(r["p90_us"])
        # algbw: bytes reduced per iteration (the whole burst) / time; GB/s = 1e3 B/us
        assert algbw == pytest.approx(max(tensors, 1) * size / time_us / 1e3, rel=1e-4)
        assert busbw == pytest.approx(algbw * 2 * (n - 1) / n, rel=1e-4)
        assert (r["strategy"], int(r["world_size"]), r["mode"], int(r["tensors"])) == (
            strategy,
            n,
            mode,
            tensors,
        )


@pytest.mark.full
def test_naive_sweep(tmp_path: Path) -> None:
    p = bench(tmp_path, "strategy=naive", *SMALL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "size         count      type   redop" in p.stdout
    assert "strategy: naive" in p.stdout and "mode: single" in p.stdout
    cols, rows = read_csv(tmp_path / "bench.csv")
    assert cols == COLUMNS
    check_rows(rows, "naive", "single", 0)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "ok"
    assert (res["strategy"], res["world_size"], res["dtype"]) == ("naive", 2, "float32")
    assert [r["size"] for r in res["size_results"]] == [1024, 4096, 16384]
    assert res["busbw_gbps"] == res["size_results"][-1]["busbw_gbps"]

    from experiments.report import collect

    _, bench_rows = collect(tmp_path.parent)
    assert {(r["strategy"], r["mode"]) for r in bench_rows if r["job"] == tmp_path.name} == {
        ("naive", "single")
    }


def bench_on_rank(cfg) -> dict:
    """On a pool rank: bench's own rank function, launched as under torchrun."""
    from omegaconf import OmegaConf

    from experiments.bench import _rank_bench
    from experiments.configs import BenchSpec
    from framework.run.launch import launch_ranks
    from framework.run.spec import ParallelSpec

    bench = BenchSpec(**OmegaConf.to_container(cfg.bench, resolve=True))
    parallel = ParallelSpec(**OmegaConf.to_container(cfg.parallel, resolve=True))
    with as_torchrun_rank():
        return launch_ranks(_rank_bench, parallel, cfg.strategy.name, {}, bench, parallel)


def test_many_small_bucketed(pools) -> None:
    """The burst mode on the long-lived ranks (the command line is tested above)."""
    cfg = compose_config("strategy=bucketed", "bench.many_small=8", *SMALL, name="bench")
    out = pools(2).run(bench_on_rank, cfg)[0]
    rows = [
        {**r, "strategy": "bucketed", "world_size": 2, "mode": "many_small:8", "tensors": 8}
        for r in out["rows"]
    ]
    check_rows([{k: str(v) for k, v in r.items()} for r in rows], "bucketed", "many_small:8", 8)
    for st in out["comm_stats"]:  # 8 calls per burst fused into one bucket
        assert st["calls_per_iter"] == 8 and st["collectives_per_iter"] == 1


@pytest.mark.full
def test_baseline_memcpy_and_profile(tmp_path: Path) -> None:
    """shm against the raw library call in one run, the copy limit beside it, and a trace."""
    p = bench(
        tmp_path,
        "strategy=shm",
        "bench.baseline=raw",
        "bench.rounds=2",
        "bench.memcpy=true",
        "profile=true",
        *SMALL,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "baseline: raw (same run, 2 interleaved rounds" in p.stdout
    _, rows = read_csv(tmp_path / "bench.csv")
    check_rows(rows, "shm", "single", 0)
    for r in rows:
        assert r["baseline"] == "raw"
        assert float(r["speedup"]) == pytest.approx(
            float(r["baseline_time_us"]) / float(r["time_us"]), rel=1e-3
        )
        assert float(r["memcpy_gbps"]) > 0
        assert float(r["busbw_of_memcpy"]) == pytest.approx(
            float(r["busbw_gbps"]) / float(r["memcpy_gbps"]), rel=1e-3
        )
        if shm_native is not None:  # the limit: a measured round trip plus the copy time
            assert 0 < float(r["round_trip_us"]) < float(r["limit_us"])
            assert float(r["of_limit"]) == pytest.approx(
                float(r["time_us"]) / float(r["limit_us"]), rel=2e-3
            )
    for rank in (0, 1):  # Chrome traces with commlab's spans next to the aten ops
        trace = json.loads((tmp_path / f"trace-rank{rank}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"commlab.shm.blocked", "commlab.shm.reduce", "aten::copy_"} <= names


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bench.factor=1", "bench.factor must be an integer >= 2"),
        ("strategy.name=nope", "unknown strategy 'nope'; available: ["),
        ("bench.baseline=nope", "unknown strategy 'nope'; available: ["),
        ("bench.rounds=0", "bench.rounds must be >= 1"),
        (
            "bench.op=all_gather_matmul bench.dtype=int32",
            "bench.op=all_gather_matmul needs a floating-point bench.dtype",
        ),
    ],
)
def test_bad_config_fails_before_spawning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, message: str
) -> None:
    """bench's main, in-process: refused with our message, recorded, and no rank launched."""
    import experiments.bench

    def spawned(*args, **kwargs):
        raise AssertionError("ranks were launched for an invalid configuration")

    monkeypatch.setattr(experiments.bench, "launch_ranks", spawned)
    cfg = compose_config(*override.split(), "logger=none", name="bench", hydra_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        experiments.bench.main(cfg)
    assert message in str(err.value)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and message in saved["error"]


def test_unknown_strategy_group_option_is_refused_at_compose() -> None:
    with pytest.raises(MissingConfigException):
        compose_config("strategy=nope", name="bench")


@pytest.mark.full
@pytest.mark.parametrize("op", ["reduce_scatter", "all_gather"])
def test_reduce_scatter_and_all_gather(pools, op: str) -> None:
    """bench.op on 3 ranks with shm's native ops: sizes are the whole buffer rounded to 3
    elements, busbw is nccl-tests' (n-1)/n of algbw, and the results are exact."""
    cfg = compose_config("strategy=shm", f"bench.op={op}", *SMALL[1:], name="bench")
    cfg.parallel.world_size = 3
    rows = pools(3).run(bench_on_rank, cfg)[0]["rows"]
    assert [r["size"] for r in rows] == [1020, 4092, 16380]  # multiples of 3 float32s
    for r in rows:
        assert r["wrong"] == 0 and r["time_us"] > 0
        algbw = r["size"] / (r["time_us"] * 1e-6) / 1e9
        assert r["algbw_gbps"] == pytest.approx(algbw, rel=1e-2)
        assert r["busbw_gbps"] == pytest.approx(algbw * 2 / 3, rel=1e-2)


@pytest.mark.parametrize(
    "op", first_only(["all_reduce_add_rmsnorm", "all_gather_matmul", "matmul_reduce_scatter"])
)
def test_fused_ops_against_their_composition(pools, op: str) -> None:
    """bench.op=<fused op>: every size timed four ways (fused, composed, the collective, the
    compute) for the strategy and a compared one; naive's fused op is its composition, bit
    for bit; overlap (gate open) chunks, within rounding."""
    cfg = compose_config(
        f"bench.op={op}",
        "bench.hidden=64",
        'bench.compare=["overlap:min_tokens=0"]',
        *SMALL[1:],
        name="bench",
    )
    rows = pools(2).run(bench_on_rank, cfg)[0]["rows"]
    assert [r["strategy"] for r in rows] == ["naive", "overlap:min_tokens=0"] * 3
    for r in rows:
        assert min(r[f"{w}_us"] for w in ("fused", "composed", "comm", "compute")) > 0
        assert r["speedup"] == pytest.approx(r["composed_us"] / r["fused_us"], rel=1e-3)
        shorter = min(r["comm_us"], r["compute_us"])
        hidden = (r["composed_us"] - r["fused_us"]) / shorter
        assert r["hidden"] == pytest.approx(hidden, rel=1e-3, abs=1e-3)
        assert r["max_diff"] == 0.0 if r["strategy"] == "naive" else r["max_diff"] < 1e-4
