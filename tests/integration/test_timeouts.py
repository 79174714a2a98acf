"""One clock per operation: every step of a composed collective runs on what is left of the
operation's ``timeout_s``, and a healthy run never fails on time its earlier operations spent.

Each test here failed before its fix (issue 22, faults 1 and 8).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from conftest import first_only

from framework import CommError, build_communicator, register_strategy
from strategies.naive import Naive
from strategies.shm import Shm


class SlowGatherShm(Shm):
    """shm whose rank 1 reaches every all-gather 20 ms after rank 0 (a slower peer)."""

    def all_gather_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.rank == 1:
            time.sleep(0.02)
        super().all_gather_(x, out)


class StallsBetweenSteps(Naive):
    """naive whose rank 1 stalls for ``stall_s`` before its all-gather (the second step of a
    two-shot all-reduce), after it was already late to the first."""

    stall_s = 1.6

    def all_gather_(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.rank == 1:
            time.sleep(self.stall_s)
        super().all_gather_(x, out)


@contextmanager
def _registered(name: str, cls: type) -> Iterator[str]:
    """A test algorithm, registered on this rank only while a test uses it (a pool rank's
    registry must not offer it to ``auto`` in later tests)."""
    from framework.comm import registry

    register_strategy(name)(cls)
    try:
        yield name
    finally:
        registry._REGISTRY.pop(name, None)


# -- fault 1: shm's clock ran on across operations ----------------------------------------------
def _quantized_twoshot_over_slow_shm(impl: str) -> dict:
    with _registered("test_slow_gather_shm", SlowGatherShm) as inner:
        opts = {"inner_options": {"impl": impl}}
        comm = build_communicator("quantized", algo="twoshot", inner=inner, timeout_s=0.5, **opts)
    x = torch.ones(256)
    t0 = time.perf_counter()
    try:
        for _ in range(40):  # 40 x 20 ms stalls: 0.8 s in all, each far within 0.5 s
            y = comm.all_reduce(x.clone()).wait()
        error = ""
    except CommError as e:
        error = str(e)
    finally:
        comm.close()
    right = not error and bool(y.eq(2).all())
    return {"error": error, "elapsed": time.perf_counter() - t0, "right": right}


@pytest.mark.parametrize("impl", first_only(["native", "python"]))
def test_every_operation_gets_its_own_clock_in_quantized_over_shm(pools, impl: str) -> None:
    for rank, r in enumerate(pools(2).run(_quantized_twoshot_over_slow_shm, impl)):
        assert r["error"] == "", f"rank {rank}: a healthy run timed out: {r['error']}"
        assert r["right"], f"rank {rank}: wrong sum"
        assert r["elapsed"] > 0.5, "the run must outlast one timeout for the test to mean much"


def _check_peers_when_every_rank_arrived(native: bool) -> str:
    from framework.comm.shm import ShmSegment

    seg = ShmSegment(dist.group.WORLD, 4096, timeout_s=0.1, native=native)
    try:
        seg.all_reduce_(torch.ones(4))  # round 1: every counter reaches 1
        dist.barrier()
        seg._deadline = time.monotonic() - 1.0  # long past
        seg._check_peers(0, 1)  # nobody is behind: no reason to fail
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        seg.close()


@pytest.mark.parametrize("native", first_only([True, False]))
def test_shm_never_times_out_with_no_rank_behind(pools, native: bool) -> None:
    assert pools(2).run(_check_peers_when_every_rank_arrived, native) == ["ok", "ok"]


# -- fault 8: a composition over the library took up to twice timeout_s -------------------------
def _twoshot_over_stalling_library() -> dict:
    with _registered("test_stalls_between_steps", StallsBetweenSteps) as inner:
        comm = build_communicator("twoshot", inner=inner, timeout_s=2.0)
    if dist.get_rank() == 1:
        time.sleep(1.2)  # late to the first step, then stalls before the second
    t0 = time.perf_counter()
    try:
        comm.all_reduce(torch.ones(64)).wait()
        out = {"error": "", "type": ""}
    except Exception as e:
        out = {"error": str(e), "type": type(e).__name__}
    out["elapsed"] = time.perf_counter() - t0
    comm.close()
    return out


def test_composed_steps_share_one_clock_and_name_the_peer(pools) -> None:
    r0, r1 = pools(2).run(_twoshot_over_stalling_library)
    assert r0["type"] == "CommError", r0  # commlab's error, not the library's RuntimeError
    assert "within timeout_s=2.0 s: rank 1 lost or late" in r0["error"], r0
    assert r0["elapsed"] < 2.4, r0  # one timeout in all (it was 1.2 + 2 s)
    # the stalled rank is not left hanging: rank 0's abandoned step completes with it
    assert r1["elapsed"] < 4.0, r1
