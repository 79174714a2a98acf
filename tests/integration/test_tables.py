"""Tuning tables: concurrent writers lose no rows, a reader never sees a torn file, a write cut
short leaves the old table, a malformed table is refused on every rank with the file, row and
field named, and tables are package data plus a user directory (issue 22 faults 3 and 6;
issue 21 point 5). Each test here failed before its fix."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.comm.tuning import load_table, merge_rows, packaged_tables_dir, table_path


def _rows(op: str, world_size: int = 2) -> list[dict]:
    return [
        {
            "op": op,
            "world_size": world_size,
            "dtype": "float32",
            "bucket_bytes": b,
            "algorithm": "naive",
            "time_us": 1.0,
        }
        for b in (256, 512, 1024)
    ]


def _writer(path: str, op: str, n: int) -> None:
    for i in range(n):
        merge_rows(path, _rows(op), {"writer": op, "i": i})


def _reader(path: str, seconds: float, out) -> None:
    torn, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            load_table(path)
        except FileNotFoundError:
            pass
        except ValueError:
            torn += 1
    out.put(torn)


def test_concurrent_writers_lose_no_rows_and_readers_see_no_torn_file(tmp_path: Path) -> None:
    path = str(tmp_path / "t.json")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(path, op, 40)) for op in ("all_reduce", "all_gather")
    ]
    procs.append(ctx.Process(target=_reader, args=(path, 3.0, out)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, "a writer or the reader failed"
    assert out.get(timeout=5) == 0, "a reader saw a torn table"
    ops = sorted({r["op"] for r in load_table(path)["rows"]})
    assert ops == ["all_gather", "all_reduce"], f"rows lost: {ops}"


def test_a_write_cut_short_leaves_the_old_table(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    merge_rows(str(path), _rows("all_reduce"), {})
    before = path.read_text()
    big = [{**r, "bucket_bytes": 1 << i} for i, r in enumerate(_rows("all_gather") * 20)]
    code = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))\n"
        "from framework.comm.tuning import merge_rows\n"
        f"merge_rows({str(path)!r}, {big!r}, {{}})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert path.read_text() == before  # the old table, whole
    assert len(load_table(str(path))["rows"]) == 3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("time_us", None, r"row 1: 'time_us' is None; it must be a finite number >= 0"),
        ("bucket_bytes", "256", r"row 1: 'bucket_bytes' is '256'; it must be a power of two"),
        ("bucket_bytes", 300, r"row 1: 'bucket_bytes' is 300"),
        ("op", "all_to_all", r"row 1: 'op' is 'all_to_all'; it must be one of"),
        ("world_size", True, r"row 1: 'world_size' is True; it must be an integer >= 1"),
    ],
)
def test_a_malformed_table_is_refused_naming_file_row_and_field(
    tmp_path: Path, field: str, value, message: str
) -> None:
    rows = _rows("all_reduce")
    rows[1][field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"rows": rows}))
    with pytest.raises(ValueError, match=message) as err:
        load_table(str(path))
    assert str(path) in str(err.value)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "torn.json"
    path.write_text('{"rows": [{"op": "all_')
    with pytest.raises(ValueError, match="not readable JSON") as err:
        load_table(str(path))
    assert str(path) in str(err.value)


def _auto_with(path: str) -> str:
    from framework import build_communicator

    t0 = time.monotonic()
    try:
        build_communicator("auto", table=path, timeout_s=30)
        return "built"
    except ValueError as e:
        return f"{time.monotonic() - t0:.1f}s {e}"


def test_auto_with_a_malformed_table_fails_on_every_rank_at_once(pools, tmp_path: Path) -> None:
    rows = _rows("all_reduce")
    rows[0]["time_us"] = None  # only rank 0 read the field (log_choices); the others waited
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"rows": rows}))
    for rank, err in enumerate(pools(2).run(_auto_with, str(path))):
        assert f"{path}: row 0: 'time_us' is None" in err, f"rank {rank}: {err}"
        assert float(err.split("s ")[0]) < 5, f"rank {rank} waited: {err}"


def test_tables_are_package_data_and_user_tables_go_to_the_user_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel install finds the shipped table without the checkout; bench.tune=NAME writes
    into the user directory, never into the installed package, and the user's copy wins."""
    monkeypatch.setenv("COMMLAB_TABLES", str(tmp_path / "mine"))
    shipped = table_path("this_host")
    assert shipped == packaged_tables_dir() / "this_host.json" and shipped.exists()
    assert load_table("this_host")["rows"]
    written = merge_rows("this_host", _rows("all_gather", world_size=3), {})
    assert written == tmp_path / "mine" / "this_host.json"
    assert table_path("this_host") == written and shipped.read_text() != written.read_text()
