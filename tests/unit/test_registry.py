"""Registry behaviour that needs no ranks: names, options, errors that list what exists."""

from __future__ import annotations

import pytest

from framework import available_strategies, build_communicator, strategy_options
from framework.comm.registry import inner_algorithms

SEVEN = {
    "naive",
    "bucketed",
    "async_overlap",
    "double_buffer",
    "tree",
    "hierarchical",
    "adaptive_threshold",
}


def test_the_seven_are_registered_under_their_file_names() -> None:
    assert set(available_strategies()) >= SEVEN
    for name in SEVEN:
        cls = __import__(f"strategies.{name}", fromlist=["x"])
        assert any(getattr(v, "name", None) == name for v in vars(cls).values())
    assert set(inner_algorithms()) >= {"naive", "tree", "hierarchical"}


def test_unknown_strategy_lists_what_exists() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'.*naive"):
        build_communicator("nope")


def test_unknown_option_lists_the_options() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['bucket_size'\].*bucket_bytes"):
        build_communicator("bucketed", bucket_size=1)


def test_options_are_keyword_only_with_defaults() -> None:
    opts = strategy_options("bucketed")
    assert opts["bucket_bytes"] == 1 << 20 and opts["inner"] == "naive"
    assert opts["validate"] is False and opts["timeout_s"] > 0
    assert "bucket_bytes" not in strategy_options("adaptive_threshold")  # the fit sets it


def test_bad_option_values_fail_before_touching_the_wire() -> None:
    for name, opts in [
        ("bucketed", {"bucket_bytes": 0}),
        ("tree", {"chunk_bytes": -1}),
        ("double_buffer", {"num_buffers": 0}),
        ("hierarchical", {"ranks_per_node": 0}),
        ("adaptive_threshold", {"min_bytes": 10, "initial_bytes": 5}),
        ("async_overlap", {"inner": "bucketed"}),
    ]:
        with pytest.raises(ValueError, match=name):
            build_communicator(name, **opts)


def test_hierarchical_node_size_from_the_launcher(monkeypatch) -> None:
    from framework.comm.env import ranks_per_node_from_env

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert ranks_per_node_from_env() is None
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")
    assert ranks_per_node_from_env() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun wins
    assert ranks_per_node_from_env() == 4


def test_a_run_loads_only_the_strategies_it_names() -> None:
    """Lazy for real: validating a run (and checking its options) imports the strategies the
    run names, its inner algorithm included, and no other plugin."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from framework.run.spec import RunSpec, validate_run\n"
        "validate_run(RunSpec(strategy='twoshot', strategy_options={'inner': 'shm'}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('strategies.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[-2] == "['strategies.shm', 'strategies.twoshot']", out.stdout
