"""shm's native hot path (framework/comm/_shm_native.c) against its Python path and the
library: the same bits for every dtype, op and chunking; the kit on the Python path (the
native one is shm's default, checked wherever shm is); the fallback when it is not built."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.distributed as dist
from conftest import first_only

from framework.comm.shm import _DTYPE_CODE
from framework.testing import run_checks

DTYPES = list(_DTYPE_CODE)  # every dtype the segment carries


def _input(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) < 0.3
    lo, hi = (0, 256) if dtype == torch.uint8 else (-100, 100)
    return torch.randint(lo, hi, (n,), generator=g).to(dtype)


def _rank_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Independent of both paths: every rank's input through the library all-gather, summed in
    rank order; 16-bit floats in float32, rounded once."""
    p = dist.get_world_size()
    raw = [torch.empty(x.nbytes, dtype=torch.uint8) for _ in range(p)]
    dist.all_gather(raw, x.view(torch.uint8))  # as bytes: gloo gathers no bool or bfloat16
    parts = [t.view(x.dtype) for t in raw]
    if x.dtype == torch.bool:
        return torch.stack(parts).any(0)
    if x.dtype in (torch.float16, torch.bfloat16):
        acc = parts[0].float()
        for t in parts[1:]:
            acc += t.float()
        return acc.to(x.dtype)
    acc = parts[0].clone()
    for t in parts[1:]:
        acc += t
    return acc


def _same_bits(capacity: int) -> list[str]:
    """Every op on both paths (and the library's rank-order sum): differences, by name."""
    from framework.comm.shm import ShmSegment

    p, r = dist.get_world_size(), dist.get_rank()
    segs = {n: ShmSegment(dist.group.WORLD, capacity, 20.0, native=n) for n in (False, True)}
    bad = []
    try:
        for dtype in DTYPES:
            for n in (1, 7, 1000, 3 * capacity // max(1, dtype.itemsize) + 5):
                x = _input(dtype, n, 1000 * r + n)
                want = _rank_order_sum(x)
                q = n // p
                got: dict[bool, list[torch.Tensor]] = {}
                for native, seg in segs.items():
                    two, one = x.clone(), x.clone()
                    seg.all_reduce_(two)
                    seg.all_reduce_oneshot_(one)
                    rs = torch.empty(q, dtype=dtype)
                    if q:
                        seg.reduce_scatter_(x[: q * p].clone(), rs)
                    ag = torch.empty(p * n, dtype=dtype)
                    seg.all_gather_(x, ag)
                    got[native] = [two, one, rs, ag]
                for native in (False, True):
                    two, one, rs, ag = got[native]
                    path = "native" if native else "python"
                    if not torch.equal(two, want):
                        bad.append(f"{path} two-shot {dtype} {n}")
                    if not torch.equal(one, want):
                        bad.append(f"{path} one-shot {dtype} {n}")
                for k, op in enumerate(["two-shot", "one-shot", "reduce_scatter", "all_gather"]):
                    a, b = got[False][k], got[True][k]
                    if a.dtype.is_floating_point:
                        a, b = a.view(torch.uint8), b.view(torch.uint8)
                    if not torch.equal(a, b):
                        bad.append(f"{op} {dtype} {n}: native differs from python")
    finally:
        for seg in segs.values():
            seg.close()
    return bad


@pytest.mark.parametrize(
    "world_size, capacity", first_only([(3, 4096), (2, 4096), (4, 1 << 16)], 1)
)
def test_native_and_python_paths_give_the_same_bits(pools, world_size: int, capacity: int) -> None:
    """Same bits on both paths and equal to the rank-order sum (16-bit floats accumulated in
    float32), one chunk and several, every dtype, every op."""
    for rank, bad in enumerate(pools(world_size).run(_same_bits, capacity)):
        assert bad == [], f"rank {rank}: {bad[:5]}"


@pytest.mark.parametrize("world_size", first_only([2, 3, 4]))
def test_python_path_conforms(pools, world_size: int) -> None:
    """The whole kit on the Python path (the default, native, runs it in test_conformance)."""
    passed = pools(world_size).run(run_checks, "shm", {"impl": "python"})
    assert all(p == passed[0] for p in passed) and len(passed[0]) >= 8


@pytest.mark.full
@pytest.mark.parametrize("mode", ["oneshot", "twoshot"])
def test_python_path_modes_and_chunks(pools, mode: str) -> None:
    opts = {"impl": "python", "mode": mode, "chunk_bytes": 1000}
    pools(3).run(run_checks, "shm", opts, ["exact_sums", "float_order", "handles_in_flight"])


def _which_path() -> dict:
    import strategies.shm as shm_strategy
    from framework import CommError, build_communicator

    seen = {}
    comm = build_communicator("shm", timeout_s=10)
    seen["auto"] = (comm.impl, comm.stats.extra["shm_native"])
    comm.close()
    built, shm_strategy.shm_native = shm_strategy.shm_native, None  # as if no compiler
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comm = build_communicator("shm", timeout_s=10)
        seen["fallback"] = (comm.impl, comm.stats.extra["shm_native"], len(caught))
        seen["fallback_sum"] = comm.all_reduce(torch.ones(8)).wait().tolist()
        comm.close()
        try:
            build_communicator("shm", impl="native", timeout_s=10).close()
            seen["native_missing"] = "no error"
        except CommError as e:
            seen["native_missing"] = str(e)
    finally:
        shm_strategy.shm_native = built
    return seen


def test_auto_takes_native_when_built_and_falls_back_with_one_warning(pools) -> None:
    from framework.comm.shm import NATIVE_MISSING, shm_native

    if shutil.which("cc") or shutil.which("gcc"):  # pip had a compiler: it must have built it
        assert shm_native is not None, NATIVE_MISSING
    for seen in pools(2).run(_which_path):
        assert seen["auto"] == (("native", 1.0) if shm_native else ("python", 0.0))
        assert seen["fallback"] == ("python", 0.0, 1), seen
        assert seen["fallback_sum"] == [2.0] * 8
        assert "not built" in seen["native_missing"], seen
