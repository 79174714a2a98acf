"""auto: dispatch by a measured table or an online tuner, exact, the same choice on every rank,
fixed after warm-up, choices counted; bench.tune writes the table auto reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import as_torchrun_rank, compose_config, run_on_rank

import experiments.configs  # noqa: F401
from experiments.bench import parse_compare, tuning_rows
from experiments.common import run_spec
from framework import build_communicator
from framework.comm.tuning import bucket_of, describe, merge_rows
from framework.testing import run_checks


def _table(path: Path, world_size: int = 2) -> str:
    rows = [
        {
            "op": "all_reduce",
            "world_size": world_size,
            "dtype": "float32",
            "bucket_bytes": b,
            "algorithm": "tree" if b <= 1024 else "shm",
            "time_us": float(b),
        }
        for b in (256, 512, 1024, 2048, 4096)
    ]
    return str(merge_rows(str(path), rows, {"host": "test"}))


def test_buckets_and_description(tmp_path: Path) -> None:
    assert [bucket_of(n) for n in (0, 1, 2, 3, 1024, 1025)] == [1, 1, 2, 4, 1024, 2048]
    rows = json.loads(Path(_table(tmp_path / "t.json")).read_text())["rows"]
    assert describe(rows) == [
        "all_reduce float32 p=2: 129 B-1 KiB -> tree (256-1.02e+03 us)",
        "all_reduce float32 p=2: 1025 B-4 KiB -> shm (2.05e+03-4.1e+03 us)",
    ]
    merge_rows(str(tmp_path / "t.json"), [{**rows[0], "world_size": 4}], {})
    merged = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert len(merged) == 6  # the world-size-2 rows are kept beside the new one


def test_options_refused_before_any_rank() -> None:
    with pytest.raises(ValueError, match="not exact; set allow_inexact"):
        build_communicator("auto", candidates=["naive", "quantized"])
    with pytest.raises(ValueError, match="'bucketed' is not an algorithm"):
        build_communicator("auto", candidates=["bucketed"])
    assert parse_compare("auto:table=x,tune_iters=5") == ("auto", {"table": "x", "tune_iters": 5})


def _dispatch(table: str | None) -> dict:
    """Calls of 512 B and 4 KiB: exact sums, and which candidate served them."""
    import torch
    import torch.distributed as dist

    from framework.run.inputs import expected_sum, rank_input

    r, p = dist.get_rank(), dist.get_world_size()
    opts = {"table": table} if table else {"candidates": ["tree", "shm", "naive"]}
    comm = build_communicator("auto", **opts)
    try:
        for numel in (128, 1024, 128):
            got = comm.all_reduce(rank_input(numel, r, numel, torch.float32)).wait()
            assert torch.equal(got, expected_sum(numel, p, numel, torch.float32))
        comm.end_warmup()
        comm.all_reduce(rank_input(9, r, 1 << 16, torch.float32)).wait()  # unseen bucket
        return {"extra": dict(comm.stats.extra), "choice": dict(comm.choice)}
    finally:
        comm.close()


def test_table_dispatch_counts_choices(pools, tmp_path: Path) -> None:
    table = _table(tmp_path / "t.json")
    for out in pools(2).run(_dispatch, table):
        extra = out["extra"]
        # 512 B twice -> tree; 4 KiB and the 256 KiB call (nearest bucket: 4 KiB) -> shm
        assert extra["auto_tree_calls"] == 2 and extra["auto_shm_calls"] == 2
        assert extra["auto_untuned_calls"] == 1


def test_table_for_another_world_size_is_refused(pools, tmp_path: Path) -> None:
    table = _table(tmp_path / "t.json", world_size=4)
    kit = pools(2).run(_dispatch_error, table)
    assert all("no rows for world size 2" in msg for msg in kit)


def _dispatch_error(table: str) -> str:
    try:
        build_communicator("auto", table=table)
    except ValueError as e:
        return str(e)
    return "built"


def test_online_tuner_same_choice_everywhere_and_frozen(pools) -> None:
    outs = pools(3).run(_dispatch, None)
    assert all(o["choice"] == outs[0]["choice"] for o in outs)  # every rank chose alike
    assert len(outs[0]["choice"]) == 2  # two buckets tuned before end_warmup, none after
    assert outs[0]["extra"]["auto_untuned_calls"] == 1


def test_kit_with_a_table(pools, tmp_path: Path) -> None:
    table = _table(tmp_path / "t.json", world_size=3)
    pools(3).run(run_checks, "auto", {"table": table}, ["exact_sums", "scatter_gather_exact"])


def test_tuning_rows_pick_the_fastest() -> None:
    rows = [
        {"size": 1024, "type": "float32", "times_us": {"tree": 5.0, "shm": 3.0, "naive": 9.0}},
        {"size": 8192, "type": "float32", "times_us": {"tree": 5.0, "shm": 7.0, "naive": 9.0}},
    ]
    got = tuning_rows(rows, ["tree", "shm"], 4, "all_gather")
    assert [(r["bucket_bytes"], r["algorithm"], r["time_us"]) for r in got] == [
        (256, "shm", 3.0),  # all-gather: size is the output, each rank sends a quarter
        (2048, "tree", 5.0),
    ]


def _bench_tune(cfg) -> dict:
    from omegaconf import OmegaConf

    from experiments.bench import _rank_bench
    from experiments.configs import BenchSpec
    from framework.run.launch import launch_ranks
    from framework.run.spec import ParallelSpec

    bench = BenchSpec(**OmegaConf.to_container(cfg.bench, resolve=True))
    parallel = ParallelSpec(**OmegaConf.to_container(cfg.parallel, resolve=True))
    with as_torchrun_rank():
        return launch_ranks(_rank_bench, parallel, "naive", {}, bench, parallel)


def test_bench_times_every_candidate_interleaved(pools) -> None:
    cfg = compose_config(
        "bench.tune=unused",
        "bench.min_bytes=1024",
        "bench.max_bytes=4096",
        "bench.iters=2",
        "bench.warmup=1",
        "parallel.world_size=2",
        name="bench",
    )
    out = pools(2).run(_bench_tune, cfg)[0]
    for row in out["rows"]:
        assert set(row["times_us"]) >= {"naive", "tree", "shm", "oneshot", "twoshot"}
        assert "quantized" not in row["times_us"] and "speedup" not in row


def test_infer_with_auto_fixes_choices_in_warmup(pools, tmp_path: Path) -> None:
    cfg = compose_config("strategy=auto", "workload.new_tokens=4")
    res = pools(2).run(run_on_rank, run_spec(cfg, str(tmp_path)))[0]
    assert res["status"] == "ok", res
    served = {k: v for k, v in res["comm_extra"].items() if k.endswith("_calls")}
    assert "auto_untuned_calls" not in served  # warm-up saw every message shape
    assert (
        sum(served.values())
        == res["per_op"]["decode"]["all_reduce"]["calls"]
        + res["per_op"]["prefill"]["all_reduce"]["calls"]
    )


def test_description_splits_at_gaps() -> None:
    rows = [
        {
            "op": "all_reduce",
            "world_size": 2,
            "dtype": "float32",
            "bucket_bytes": b,
            "algorithm": "shm",
            "time_us": 1.0,
        }
        for b in (4096, 65536)
    ]
    assert describe(rows) == [
        "all_reduce float32 p=2: 2049 B-4 KiB -> shm (1-1 us)",
        "all_reduce float32 p=2: 32769 B-64 KiB -> shm (1-1 us)",
    ]
