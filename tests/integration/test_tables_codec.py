"""Issue 22, faults 3, 6 and 9, the edges left after the first fixes (test_tables.py and
test_quantized.py hold the first ones): a merge into a malformed table names the file and
keeps it, a table gets the usual file mode, every schema rule fails as a ValueError naming
file, row and field (a time past the float range raised OverflowError), a non-finite input
turns its whole block into NaN in every format (int4 decoded an inf to -3.4e38), and the top
of each dtype's range goes through the quantized strategy finite and within its bound."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from framework.comm import quant
from framework.comm.tuning import load_table, merge_rows


def _rows(op: str = "all_reduce") -> list[dict]:
    return [
        {
            "op": op,
            "world_size": 2,
            "dtype": "float32",
            "bucket_bytes": b,
            "algorithm": "naive",
            "time_us": 1.0,
        }
        for b in (256, 512)
    ]


# -- tables ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ('{"rows": [{"op": "all_', "not readable JSON"),
        (json.dumps({"rows": [{**_rows()[0], "time_us": None}]}), "row 0: 'time_us' is None"),
    ],
    ids=["torn", "bad-row"],
)
def test_a_merge_into_a_malformed_table_names_it_and_leaves_it(
    tmp_path: Path, text: str, message: str
) -> None:
    """A merge read the old table with a bare json.loads: a JSONDecodeError without the file."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        merge_rows(str(path), _rows("all_gather"), {})
    assert str(path) in str(err.value) and "not merged" in str(err.value)
    assert path.read_text() == text  # refused, not overwritten


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_table_gets_the_mode_open_would_give(tmp_path: Path, umask: int, mode: int) -> None:
    """0666 less the umask, as for any file the user writes (was 0644 whatever the umask)."""
    path = tmp_path / "t.json"
    old = os.umask(umask)
    try:
        merge_rows(str(path), _rows(), {})
        merge_rows(str(path), _rows("all_gather"), {})  # a rewrite, through the temporary file
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _row0(**change) -> dict:
    return {"rows": [{**_rows()[0], **change}]}


@pytest.mark.parametrize(
    "table, message",
    [
        ([], "must be an object with a list 'rows'"),
        ({"rows": {}}, "must be an object with a list 'rows'"),
        ({"rows": [3]}, "row 0: must be an object, got 3"),
        ({"rows": [{k: v for k, v in _rows()[0].items() if k != "dtype"}]}, "'dtype' is missing"),
        (_row0(dtype=3), "'dtype' is 3; it must be a dtype name"),
        (_row0(world_size=0), "'world_size' is 0; it must be an integer >= 1"),
        (_row0(world_size=2.0), "'world_size' is 2.0"),
        (_row0(bucket_bytes=True), "'bucket_bytes' is True; it must be a power of two"),
        (_row0(bucket_bytes=0), "'bucket_bytes' is 0"),
        (_row0(algorithm=""), "'algorithm' is ''; it must be a strategy name"),
        (_row0(time_us=-1.0), "'time_us' is -1.0; it must be a finite number >= 0"),
        (_row0(time_us=True), "'time_us' is True"),
        (_row0(time_us=float("nan")), "'time_us' is nan"),
        (_row0(time_us=float("inf")), "'time_us' is inf"),
        (_row0(time_us=10**400), "'time_us' is 1000"),  # was OverflowError
    ],
)
def test_every_schema_rule_is_a_value_error_naming_file_row_and_field(
    tmp_path: Path, table, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(table))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ValueError, match=message) as err:
        load_table(str(path))
    assert f"tuning table {path}: " in str(err.value)


def test_bench_tune_rows_pass_the_check(tmp_path: Path) -> None:
    """What bench.tune writes (integer sizes, measured float medians, its extra times_us)."""
    from experiments.bench import tuning_rows

    measured = [
        {"size": s, "type": "bfloat16", "times_us": {"tree": 5.25, "shm": 0.0}}
        for s in (1, 1000, 1 << 20)
    ]
    rows = tuning_rows(measured, ["tree", "shm"], 3, "all_gather")
    path = merge_rows(str(tmp_path / "t.json"), rows, {})
    assert len(load_table(str(path))["rows"]) == 3


# -- codec ----------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> list[int]:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]).tolist()


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_input_makes_its_whole_block_nan(fmt: str, bad: float) -> None:
    """int4 decoded an inf to -3.4e38 beside NaNs, and every integer format cast NaN codes to
    int (undefined); now: NaN scale, zero codes, the whole block NaN, the others as usual."""
    for pos in (0, 5, 7):
        x = torch.linspace(-3.0, 3.0, 24)
        x[8 + pos] = bad  # the second of three blocks of 8
        out = torch.empty(quant.payload_bytes(fmt, 24, 8), dtype=torch.uint8)
        quant.encode(x, fmt, 8, out)
        got = quant.decode(out, fmt, 8, 24)
        assert got[8:16].isnan().all(), (pos, got)
        assert _bits(got) == _bits(quant.decode(out.clone(), fmt, 8, 24))
        for lo in (0, 16):
            y, ref = got[lo : lo + 8].double(), x[lo : lo + 8]
            assert ((y - ref.double()).abs() <= quant.error_bound(ref, fmt, 8)).all()


def _edges(dtype_name: str) -> tuple[list[str], list[list[int]]]:
    """On every rank: the quantized strategy on the dtype's maximum, and an inf on rank 0.
    Returns the problems (none: empty) and the bits of the results every rank shares."""
    import torch.distributed as dist

    from framework import build_communicator

    dtype = getattr(torch, dtype_name)
    r, p = dist.get_rank(), dist.get_world_size()
    top = torch.finfo(dtype).max
    base = torch.linspace(-top, top, 32, dtype=torch.float64)
    base[3], base[20] = top, -top
    inputs = [(base * (1.0 if j == 0 else -0.5)).to(dtype) for j in range(p)]  # no overflow
    exact = sum(x.double() for x in inputs)
    problems, shared = [], []
    for fmt in quant.FORMATS:
        for algo in ("oneshot", "twoshot"):
            comm = build_communicator("quantized", fmt=fmt, algo=algo, block=8, timeout_s=20)
            try:
                for op in ("all_reduce", "reduce_scatter", "all_gather"):
                    got = getattr(comm, op)(inputs[r].clone()).wait()
                    want = {
                        "all_reduce": exact,
                        "reduce_scatter": exact.view(p, -1)[r],
                        "all_gather": torch.cat([x.double() for x in inputs]),
                    }[op]
                    bound = comm.error_bound(op, inputs, r)
                    if not got.isfinite().all() or ((got.double() - want).abs() > bound).any():
                        problems.append(f"{fmt} {algo} {op}: {got.tolist()}")
                    if op != "reduce_scatter":
                        shared.append(_bits(got))
                x = torch.ones(32, dtype=dtype)
                if r == 0:
                    x[3] = float("inf")
                got = comm.all_reduce(x).wait()
                if not (got[:8].isnan().all() and ((got[8:].double() - 2).abs() < 0.01).all()):
                    problems.append(f"{fmt} {algo} inf: {got.tolist()}")
                shared.append(_bits(got))
            finally:
                comm.close()
    return problems, shared


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_the_top_of_each_dtype_through_the_strategy(pools, dtype_name: str) -> None:
    """int8 decoded 3.4e38 to inf; float16 and bfloat16 results are cast back from float32.
    Every format, both algorithms, every op: finite, within the stated bound, the same bits
    on every rank; an inf on one rank: its block NaN on every rank, the other blocks kept."""
    (p0, bits0), (p1, bits1) = pools(2).run(_edges, dtype_name, timeout_s=60)
    assert p0 == [] and p1 == [], p0 + p1
    assert bits0 == bits1
