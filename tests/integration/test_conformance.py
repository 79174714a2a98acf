"""The conformance kit over every registered strategy and world sizes 1-4, plus compositions."""

from __future__ import annotations

import pytest
from conftest import FULL, first_only, one_each

from framework import Algorithm, Schedule, available_strategies, get_strategy
from framework.testing import run_checks

STRATEGIES = available_strategies()
SCHEDULES = [n for n in STRATEGIES if issubclass(get_strategy(n), Schedule)]
# every exact algorithm a schedule can send through, except the library call (the schedules'
# default inner, already covered by test_kit) and shm (crossed with every schedule in test_shm);
# a schedule over a quantized wire states no error bound (fusion moves the blocks)
INNER = [
    n
    for n in STRATEGIES
    if issubclass(get_strategy(n), Algorithm)
    and get_strategy(n).exact
    and n not in ("naive", "shm")
]


@pytest.mark.parametrize("name, world_size", one_each(STRATEGIES, (2, 3, 1, 4), tier=2))
def test_kit(pools, name: str, world_size: int) -> None:
    passed = pools(world_size).run(run_checks, name, {})
    assert all(p == passed[0] for p in passed) and len(passed[0]) >= 8


COMPOSED_CHECKS = ["exact_sums", "handles_in_flight", "flush_semantics", "validate_mismatch"]


@pytest.mark.parametrize(
    "name, inner",
    [  # the README tier: each schedule over one inner algorithm, each inner once
        pytest.param(name, inner, marks=() if j == i % len(INNER) and inner != "auto" else (FULL,))
        for i, name in enumerate(SCHEDULES)
        for j, inner in enumerate(INNER)
    ],
)
def test_schedules_over_inner_algorithms(pools, name: str, inner: str) -> None:
    """A sweep may cross any schedule with any algorithm: both must stay exact."""
    options = {"inner": inner}
    if inner == "hierarchical":
        options["inner_options"] = {"ranks_per_node": 2}
    pools(3).run(run_checks, name, options, COMPOSED_CHECKS)


@pytest.mark.parametrize("ranks_per_node", first_only([2, 1, 3]))
@pytest.mark.parametrize("world_size", first_only([3, 4]))
def test_hierarchical_node_maps(pools, world_size: int, ranks_per_node: int) -> None:
    """Emulated nodes of every shape, including a last node smaller than the others."""
    pools(world_size).run(
        run_checks,
        "hierarchical",
        {"ranks_per_node": ranks_per_node},
        ["exact_sums", "float_order", "handles_in_flight", "scatter_gather_exact"],
    )


@pytest.mark.full
def test_small_chunks_pipeline_tree(pools) -> None:
    """Chunks much smaller than the message exercise the tree's pipelining and odd tails."""
    pools(4).run(run_checks, "tree", {"chunk_bytes": 3000}, ["exact_sums", "float_order"])


@pytest.mark.full
def test_small_buckets_split(pools) -> None:
    """Buckets smaller than the burst force several buckets per wait, launched in order."""
    pools(3).run(
        run_checks, "bucketed", {"bucket_bytes": 64}, ["handles_in_flight", "bounded_loop"]
    )


def _fused_scatter_gather(inner: str) -> dict[str, int]:
    """Three reduce-scatters and three all-gathers of one dtype in flight: checked against
    the exact sums; returns the collectives each op put on the wire."""
    import torch
    import torch.distributed as dist

    from framework import build_communicator
    from framework.run.inputs import expected_sum, rank_input

    r, p = dist.get_rank(), dist.get_world_size()
    comm = build_communicator("bucketed", inner=inner, timeout_s=30)
    try:
        shapes = [(p * 2, 3), (p, 5), (p * 4, 1)]
        rs = [
            comm.reduce_scatter(rank_input(i, r, s[0] * s[1], torch.float32).view(s))
            for i, s in enumerate(shapes)
        ]
        ag = [
            comm.all_gather(rank_input(10 + i, r, s[0] * s[1], torch.float32).view(s))
            for i, s in enumerate(shapes)
        ]
        for i, (h, s) in enumerate(zip(rs, shapes)):
            want = expected_sum(i, p, s[0] * s[1], torch.float32).view(s)
            assert torch.equal(h.wait(), want[r * s[0] // p : (r + 1) * s[0] // p]), i
        for i, (h, s) in enumerate(zip(ag, shapes)):
            want = torch.cat(
                [rank_input(10 + i, j, s[0] * s[1], torch.float32).view(s) for j in range(p)]
            )
            assert torch.equal(h.wait(), want), i
        return {op: c["collectives"] for op, c in comm.stats.by_op.items() if c["collectives"]}
    finally:
        comm.close()


@pytest.mark.parametrize("world_size, inner", [(2, "naive"), (3, "tree")])
def test_bucketed_fuses_each_op(pools, world_size: int, inner: str) -> None:
    got = pools(world_size).run(_fused_scatter_gather, inner)
    assert all(g == {"reduce_scatter": 1, "all_gather": 1} for g in got)


@pytest.mark.parametrize(  # tree's ops are the library's
    "name, inner", one_each(["oneshot", "twoshot"], ("shm", "hierarchical"))
)
def test_oneshot_twoshot_over_inner_algorithms(pools, name: str, inner: str) -> None:
    """Built on another algorithm's reduce-scatter and all-gather (shm's native ones,
    hierarchical's two-level ones)."""
    options = (
        {"inner": inner, "inner_options": {"ranks_per_node": 2}}
        if inner == "hierarchical"
        else {"inner": inner}
    )
    pools(4 if inner == "hierarchical" else 3).run(
        run_checks, name, options, ["float_order", "handles_in_flight", "mixed_ops_in_flight"]
    )


def _off_by_one_kit(check: str) -> str:
    """An exact strategy whose all-reduce adds 1 to its first element must fail ``check``."""
    from framework import get_strategy, register_strategy
    from framework.comm.registry import available_strategies

    if "naive_off_by_one" not in available_strategies():

        @register_strategy("naive_off_by_one")
        class OffByOne(get_strategy("naive")):
            def reduce_(self, x):
                super().reduce_(x)
                x.view(-1)[0] += 1

    try:
        run_checks("naive_off_by_one", {}, [check])
    except AssertionError as e:
        return str(e)
    finally:  # a pool rank's registry must not offer it to auto in later tests
        from framework.comm import registry

        registry._REGISTRY.pop("naive_off_by_one", None)
    return "passed"


@pytest.mark.parametrize("check", ["exact_sums", "mixed_ops_in_flight", "handles_in_flight"])
def test_kit_catches_a_wrong_sum(pools, check: str) -> None:
    for msg in pools(2).run(_off_by_one_kit, check):
        assert "result differs from the exact sum" in msg, msg


def _bad_fused_kit(fault: str) -> str:
    """A strategy whose fused op is wrong in one way (the collective itself is right) must
    fail the kit's fused check."""
    import torch

    from framework import Handle, get_strategy, register_strategy
    from framework.comm.fused import add_rmsnorm
    from framework.comm.registry import available_strategies

    name = f"naive_bad_{fault}"
    if name not in available_strategies():

        @register_strategy(name)
        class Bad(get_strategy("naive")):
            def _all_reduce_add_rmsnorm(self, partial, residual, weight, eps):
                if fault == "norm_eps":  # the norm with another eps
                    return self.then(self._all_reduce(partial), add_rmsnorm, residual, weight, 0.1)
                return super()._all_reduce_add_rmsnorm(partial, residual, weight, eps)

            def _matmul_reduce_scatter(self, x, weight):
                if fault == "rows":  # every rank keeps the next rank's rows of the sum
                    full = self._all_reduce(torch.matmul(x, weight)).wait()
                    q, p = x.shape[0] // self.world_size, self.world_size
                    j = (self.rank + 1) % p
                    return Handle(self, None, full[j * q : (j + 1) * q].clone())
                return super()._matmul_reduce_scatter(x, weight)

    try:
        run_checks(name, {}, ["fused_ops"])
    except AssertionError as e:
        return str(e)
    finally:
        from framework.comm import registry

        registry._REGISTRY.pop(name, None)
    return "passed"


@pytest.mark.parametrize("fault", first_only(["norm_eps", "rows"]))
def test_kit_catches_a_wrong_fused_op(pools, fault: str) -> None:
    for msg in pools(2).run(_bad_fused_kit, fault):
        assert "failed check 'fused_ops'" in msg, msg
        assert ("all_reduce_add_rmsnorm" if fault == "norm_eps" else "matmul_reduce_scatter") in msg


def test_overlap_chunks_conform(pools) -> None:
    """overlap with its gate open: every fused op chunked, three chunks at world size 3."""
    pools(3).run(run_checks, "overlap", {"min_tokens": 0, "chunks": 3}, ["fused_ops"])


@pytest.mark.parametrize("world_size", first_only([2, 3, 4]))
def test_shm_fused_epilogue_conforms(pools, world_size: int) -> None:
    """shm with the add and norm inside its reduction (rows split between ranks, results
    copied out): the composed op's bits, every rank alike."""
    pools(world_size).run(run_checks, "shm", {"fuse_epilogue": True}, ["fused_ops"])
