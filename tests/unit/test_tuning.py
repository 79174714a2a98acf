"""auto's tables on known rows: size buckets, descriptions, the fastest per size, refused
options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_table

from experiments.bench import tuning_rows
from framework import build_communicator
from framework.comm.tuning import bucket_of, describe, merge_rows
from framework.run.spec import parse_strategy


def test_buckets_and_description(tmp_path: Path) -> None:
    assert [bucket_of(n) for n in (0, 1, 2, 3, 1024, 1025)] == [1, 1, 2, 4, 1024, 2048]
    rows = json.loads(Path(write_table(tmp_path / "t.json")).read_text())["rows"]
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
    assert parse_strategy("auto:table=x,tune_iters=5") == ("auto", {"table": "x", "tune_iters": 5})


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


def test_a_table_is_read_once_per_version(tmp_path, monkeypatch) -> None:
    """auto checks its options, then builds: the table is parsed once, and again only after
    it was rewritten."""
    from framework.comm import tuning

    row = {
        "op": "all_reduce",
        "world_size": 2,
        "dtype": "float32",
        "bucket_bytes": 256,
        "algorithm": "tree",
        "time_us": 1.0,
    }
    path = tuning.merge_rows(str(tmp_path / "t.json"), [row], {})
    reads = []
    real = tuning._read
    monkeypatch.setattr(tuning, "_read", lambda p: reads.append(p) or real(p))
    first = tuning.load_table(str(path))
    first["rows"].clear()  # a caller's copy: the cache is not touched
    assert tuning.load_table(str(path))["rows"] == [row] and len(reads) == 1
    tuning.merge_rows(str(path), [{**row, "algorithm": "shm"}], {})  # renamed over it
    before = len(reads)  # merge_rows read it too, under its lock
    assert tuning.load_table(str(path))["rows"][0]["algorithm"] == "shm"
    assert len(reads) == before + 1
