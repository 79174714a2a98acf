"""parallel.cpu_bind: parsing, validation, and pinning every thread of a process."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from framework.run.binding import bind_rank, cores_for, cpu_bind_problem, parse_cpu_sets


def test_core_sets_parse() -> None:
    assert parse_cpu_sets("0,2-3;1") == [{0, 2, 3}, {1}]
    for bad in ("", "0;", "3-1", "a", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_sets(bad)


def test_problems_are_named() -> None:
    first = min(os.sched_getaffinity(0))
    assert cpu_bind_problem("none", 4) is None
    assert cpu_bind_problem("spread", 4) is None
    assert cpu_bind_problem(f"{first};{first}", 2) is None
    assert "2 core sets for 3 ranks" in cpu_bind_problem(f"{first};{first}", 3)
    assert "not among" in cpu_bind_problem("0;100000", 2)
    assert "core sets" in cpu_bind_problem("zero", 1)


def test_spread_wraps_around_the_allowed_cores() -> None:
    allowed = {2, 5}
    assert [cores_for("spread", r, allowed) for r in range(3)] == [{2}, {5}, {2}]
    assert cores_for("spread", 1, {0, 1, 2, 3}, threads=2) == {2, 3}
    assert cores_for("none", 0, allowed) is None
    assert cores_for("1;0", 1, allowed) == {0}


def test_auto_pins_only_when_every_rank_gets_cores_of_its_own() -> None:
    four = {0, 1, 2, 3}
    assert cores_for("auto", 1, four, ranks=2, threads=2) == {2, 3}
    assert cores_for("auto", 1, four, ranks=4, threads=2) is None
    assert cores_for("auto", 3, four, ranks=4) == {3}


def test_bind_rank_pins_threads_that_already_run_and_later_ones() -> None:
    before = os.sched_getaffinity(0)
    stop = threading.Event()
    early = threading.Thread(target=stop.wait)
    early.start()
    try:
        one = {min(before)}
        assert bind_rank(f"{min(before)}", 0) == one
        assert os.sched_getaffinity(early.native_id) == one  # started before the binding
        late = threading.Thread(target=stop.wait)
        late.start()
        assert os.sched_getaffinity(late.native_id) == one  # inherits it
        stop.set()
        late.join()
    finally:
        stop.set()
        early.join()
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), before)
