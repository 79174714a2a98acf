"""The shared-memory transport: composition, node maps, clean-up and failure detection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import FULL, first_only

from framework import Schedule, available_strategies, get_strategy
from framework.testing import run_checks

COMPOSED_CHECKS = ["exact_sums", "handles_in_flight", "flush_semantics", "bounded_loop"]


@pytest.mark.parametrize(
    "name",
    first_only([n for n in available_strategies() if issubclass(get_strategy(n), Schedule)], 2),
)
def test_schedules_over_shm(pools, name: str) -> None:
    """Every schedule sends its collectives through shm from its progress thread."""
    pools(3).run(run_checks, name, {"inner": "shm"}, COMPOSED_CHECKS)


@pytest.mark.parametrize(("world_size", "ranks_per_node"), first_only([(4, 2), (3, 2), (4, 4)]))
def test_hierarchical_with_shm_inside_nodes(pools, world_size: int, ranks_per_node: int) -> None:
    pools(world_size).run(
        run_checks,
        "hierarchical",
        {"intra": "shm", "ranks_per_node": ranks_per_node},
        ["exact_sums", "float_order", "handles_in_flight"],
    )


@pytest.mark.full
def test_chunked_messages(pools) -> None:
    """Chunks far smaller than the message: the multi-chunk path and its odd tails, for the
    three ops and both all-reduce modes."""
    checks = ["exact_sums", "float_order", "scatter_gather_exact"]
    pools(3).run(run_checks, "shm", {"chunk_bytes": 1000}, checks)
    pools(3).run(run_checks, "shm", {"chunk_bytes": 1000, "mode": "oneshot"}, checks[:2])


SHM_MODE_CHECKS = ["exact_sums", "float_order", "handles_in_flight", "mixed_ops_in_flight"]


@pytest.mark.parametrize(
    "world_size, options",
    [
        pytest.param(
            4, {"mode": "oneshot"}, marks=FULL
        ),  # two-shot is auto's choice here: test_kit covers it
        # sizes on both sides of the limit: one-shot rounds (one barrier) next to two-shot
        # rounds, reduce-scatters and all-gathers, in any order
        (2, {"mode": "auto", "oneshot_max_bytes": 4096}),
        pytest.param(4, {"mode": "auto", "oneshot_max_bytes": 4096}, marks=FULL),
    ],
)
def test_modes(pools, world_size: int, options: dict) -> None:
    pools(world_size).run(run_checks, "shm", options, SHM_MODE_CHECKS)


def _mode_bits(mode: str) -> list[float]:
    from framework import build_communicator

    comm = build_communicator("shm", mode=mode, timeout_s=20)
    try:
        x = torch.randn(10_001, generator=torch.Generator().manual_seed(dist.get_rank()))
        return comm.all_reduce(x).wait().tolist()
    finally:
        comm.close()


def test_modes_give_the_same_bits(pools) -> None:
    """Both modes sum slot 0 + slot 1 + ... per element: identical floats, not just close."""
    one = pools(3).run(_mode_bits, "oneshot")
    two = pools(3).run(_mode_bits, "twoshot")
    assert one == two and one[0] == one[1] == one[2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _segment_lifecycle(stale_pid: int) -> dict:
    from framework import build_communicator
    from framework.comm.shm import SHM_DIR, segment_name

    stale = SHM_DIR / segment_name(stale_pid)
    if dist.get_rank() == 0:
        stale.write_bytes(b"left by a crashed run")
    dist.barrier()
    comm = build_communicator("shm", timeout_s=20)
    try:
        path = comm.segment.path
        x = torch.full((1000,), float(dist.get_rank() + 1))
        y = comm.all_reduce(x).wait()
        return {
            "stale_exists": stale.exists(),
            "segment_named": path.exists(),
            "sum_ok": bool((y == sum(range(1, dist.get_world_size() + 1))).all()),
            "shm_used": comm.stats.extra["shm"],
        }
    finally:
        comm.close()


def test_stale_segment_removed_and_live_segment_unnamed(pools) -> None:
    """A stale file from a dead process is removed; a live segment has no name to leak."""
    got = pools(2).run(_segment_lifecycle, _dead_pid())
    assert (
        got
        == [{"stale_exists": False, "segment_named": False, "sum_ok": True, "shm_used": 1.0}] * 2
    )


def _peer_failure(kind: str, native: bool) -> str:
    from framework.comm.shm import ShmError, ShmSegment

    group = dist.new_group([0, 1])
    seg = ShmSegment(group, 4096, timeout_s=1.0, native=native)
    try:
        if dist.get_rank() == 1:
            if kind == "dead":  # pretend rank 1 died: its pid in the segment is a dead one
                seg._flags[seg._pids_at + 1] = _dead_pid()
            dist.barrier()
            return ""
        dist.barrier()
        try:
            seg.all_reduce_(torch.ones(16))  # rank 1 never joins
        except ShmError as e:
            return str(e)
        return "no error"
    finally:
        seg.close()


@pytest.mark.parametrize(
    ("kind", "message", "native"),
    first_only(
        [
            ("dead", "rank 0: rank(s) [1] (pid [", True),
            ("slow", "rank 0: timed out after", True),
            ("dead", "rank 0: rank(s) [1] (pid [", False),
            ("slow", "rank 0: timed out after", False),
        ],
        2,
    ),
)
def test_missing_peer_is_an_error_naming_it(pools, kind: str, message: str, native: bool) -> None:
    err = pools(2).run(_peer_failure, kind, native)[0]
    assert message in err and "round 1" in err, err


def test_no_segment_left_after_a_process_exits(tmp_path: Path) -> None:
    """Segments are unlinked once every rank has mapped them: exit leaves nothing behind."""
    before = {p.name for p in Path("/dev/shm").glob("commlab-shm-*")}
    code = (
        "import os, torch.distributed as dist\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29631')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "from framework import build_communicator\n"
        "c = build_communicator('shm'); print(c.stats.extra['shm'])\n"
        "os._exit(0)\n"  # no close(), no atexit: the hardest exit short of a crash
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert r.returncode == 0, r.stderr
    assert {p.name for p in Path("/dev/shm").glob("commlab-shm-*")} <= before
