"""Selection under an error budget and determinism, checked without ranks: the accuracy table,
which candidates a budget keeps, and the element error a strategy states."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from framework.comm.accuracy import admissible, load_accuracy, within, write_accuracy
from framework.comm.registry import parse_strategy, strategy_label


def _algo(exact: bool = True, order: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(exact=exact, summation_order=order)


def _table(tmp_path: Path) -> str:
    rows = [
        {
            "strategy": "quantized:block=32,fmt=int8",
            "world_size": 2,
            "ppl_change": 0.001,
            "ppl_change_hi": 0.004,
            "kl_per_token": 0.0005,
        },
        {
            "strategy": "quantized:block=32,fmt=int4",
            "world_size": 2,
            "ppl_change": 0.03,
            "ppl_change_hi": 0.05,
            "kl_per_token": 0.02,
        },
    ]
    return str(write_accuracy(tmp_path / "acc.json", rows, {"model": "test"}))


def test_budget_keeps_exact_and_what_was_measured_within_it(tmp_path: Path) -> None:
    table = _table(tmp_path)
    algos = {
        "naive": _algo(),
        "quantized:block=32,fmt=int8": _algo(exact=False),
        "quantized:block=32,fmt=int4": _algo(exact=False),
        "quantized:block=128,fmt=int4": _algo(exact=False),  # never measured
    }
    kept, dropped, _ = admissible(algos, 2, {"ppl_change": 0.01}, table, False)
    assert kept == ["naive", "quantized:block=32,fmt=int8"]
    assert dropped["quantized:block=32,fmt=int4"] == "ppl_change 0.05 > 0.01"  # the interval's top
    assert "no ppl_change measured" in dropped["quantized:block=128,fmt=int4"]
    kept, _, _ = admissible(algos, 2, {"ppl_change": 0.1, "kl_per_token": 0.01}, table, False)
    assert kept == ["naive", "quantized:block=32,fmt=int8"]  # every bound holds, or it goes
    # a label written with its options in another order is the same candidate
    kept, _, _ = admissible(
        {"quantized:fmt=int8,block=32": _algo(exact=False)}, 2, {"ppl_change": 0.01}, table, False
    )
    assert kept == ["quantized:fmt=int8,block=32"]
    kept, _, _ = admissible(algos, 3, {"ppl_change": 0.1}, table, False)
    assert kept == ["naive"]  # rows of another world size say nothing about this one


def test_deterministic_keeps_one_size_independent_order() -> None:
    algos = {
        "naive": _algo(order=None),
        "tree": _algo(order="tree"),
        "oneshot": _algo(order="rank"),
        "shm": _algo(order="rank"),
    }
    kept, dropped, order = admissible(algos, 2, None, None, True)
    assert (kept, order) == (["oneshot", "shm"], "rank")
    assert "depends on the message size" in dropped["naive"]
    assert dropped["tree"] == "sums in tree order, not rank"
    kept, _, order = admissible({"tree": _algo(order="tree"), **algos}, 2, None, None, True)
    assert order == "rank" and kept == ["oneshot", "shm"]  # most common order wins


def test_within_and_labels_round_trip() -> None:
    row = {"ppl_change_hi": 0.02, "kl_per_token": 0.001}
    assert within(row, {"kl_per_token": 0.01}) is None
    assert within(row, {"ppl_change": 0.01}) == "ppl_change 0.02 > 0.01"
    assert within(None, {"rel_error": 0.1}) is None  # per message, not from the table
    label = strategy_label("quantized", {"fmt": "int8", "block": 32})
    assert label == "quantized:block=32,fmt=int8"
    assert parse_strategy(label) == ("quantized", {"block": 32, "fmt": "int8"})


def test_malformed_accuracy_table_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"strategy": "q", "world_size": 2, "ppl_change": "x"}]}))
    with pytest.raises(ValueError, match=r"bad\.json: row 0: ppl_change must be a finite number"):
        load_accuracy(str(bad))
    with pytest.raises(FileNotFoundError, match="accuracy table 'nope' not found"):
        load_accuracy("nope")


def test_auto_refuses_budgets_it_cannot_read(tmp_path: Path) -> None:
    from framework import get_strategy

    auto = get_strategy("auto")
    with pytest.raises(ValueError, match="reads them from an accuracy table"):
        auto.check_options(error_budget={"ppl_change": 0.01})
    with pytest.raises(ValueError, match="error_budget bounds"):
        auto.check_options(error_budget={"accuracy": 1.0})
    with pytest.raises(ValueError, match="accuracy: accuracy table 'missing' not found"):
        auto.check_options(error_budget={"ppl_change": 0.01}, accuracy="missing")
    with pytest.raises(ValueError, match="is not exact"):  # no budget: inexact needs consent
        auto.check_options(candidates=["naive", "quantized:fmt=int8"])
    auto.check_options(  # a budget is that consent
        candidates=["naive", "quantized:fmt=int8,block=32"],
        error_budget={"ppl_change": 0.01},
        accuracy=_table(tmp_path),
    )


def test_the_accuracy_table_is_read_once_per_version(tmp_path: Path) -> None:
    """auto checks its options (reading the table), then builds (reading it again): one
    parse per version of the file; a table written over it is read afresh."""
    from framework.comm import accuracy

    name = _table(tmp_path)
    accuracy._read_once.cache_clear()
    first = load_accuracy(name)
    first["rows"].clear()  # a caller's copy: the cache is not touched
    assert len(load_accuracy(name)["rows"]) == 2
    assert accuracy._read_once.cache_info().misses == 1
    data = json.loads(Path(name).read_text())
    write_accuracy(name, data["rows"][:1], {})  # atomically renamed over it
    assert len(load_accuracy(name)["rows"]) == 1
    assert accuracy._read_once.cache_info().misses == 2
