"""The cost model's GPU presets against published H100 measurements (results/published/).

Pure computation over committed CSVs; ``python -m experiments.published`` writes the same
comparison to ``results/published/CHECK.md``.
"""

from __future__ import annotations

import math

import pytest

from experiments.published import (
    CHECK_SOURCES,
    FIT_SOURCES,
    GOAL,
    Row,
    crossover_ratios,
    fit_custom_ar,
    fit_presets,
    load_tables,
    preset_error,
    table_errors,
)
from framework.costmodel import busbw_gbps, library_time, load_topology


@pytest.mark.parametrize("preset", sorted(CHECK_SOURCES))
def test_every_published_table_within_the_goal(preset: str) -> None:
    """Every checked table, fitted or held out, within 15% median error (before the presets
    followed NCCL's own tuning model the held-out InfiniBand tables were at 12-28%)."""
    rows = load_tables()
    topo = load_topology(preset)
    per_table = table_errors(topo, rows, CHECK_SOURCES[preset])
    assert set(per_table) == set(CHECK_SOURCES[preset])  # every table has rows in the window
    assert all(e["median"] <= GOAL for e in per_table.values()), per_table
    assert preset_error(topo, rows, CHECK_SOURCES[preset]) <= 0.10, per_table


def test_most_tables_are_held_out() -> None:
    """The 4- and 8-node tables and the other 2-node clusters only check the fit."""
    held_out = set(CHECK_SOURCES["h100_ib"]) - set(FIT_SOURCES["h100_ib"])
    assert {"NCCLT309_4N", "NCCLT309_GJ_4N", "NCCLT309_GJ_8N"} <= held_out
    assert len(FIT_SOURCES["h100_ib"]) == 1


def test_presets_are_what_the_fit_gives() -> None:
    """The YAML constants are reproducible: ``experiments.published --fit`` gives them."""
    for name, topo in fit_presets().items():
        shipped = load_topology(name)
        assert topo.base_s == pytest.approx(shipped.base_s, rel=0.02), name
        assert topo.intra.bandwidth_gbps == pytest.approx(shipped.intra.bandwidth_gbps, rel=0.02)
        assert topo.inter.bandwidth_gbps == shipped.inter.bandwidth_gbps  # stated, not fitted
        for key, value in topo.nccl.items():
            assert value == pytest.approx(shipped.nccl[key], rel=0.02), (name, key)
    ar = fit_custom_ar()
    shipped = load_topology("h100_nvlink").custom_ar
    assert ar["alpha_s"] == pytest.approx(shipped.alpha_s, rel=0.02)
    assert ar["bandwidth_gbps"] == pytest.approx(shipped.bandwidth_gbps, rel=0.02)


def _row(source: str, size: int) -> Row:
    return next(r for r in load_tables() if r.source_id == source and r.size == size)


def test_two_nodes_run_at_the_node_bandwidth_more_run_at_the_nics() -> None:
    """NCCL's rule by node count: on two nodes 1 GiB moves at about the NVLink bus bandwidth
    (busbw 449 GB/s published, above the 8 NICs' 400), on four at the NICs' (358 published,
    held out); a flat rule would be 20% off on one of them."""
    ib = load_topology("h100_ib")
    for source, p in (("NCCLT309_XE9680_2N", 16), ("NCCLT309_4N", 32)):
        row = _row(source, 1 << 30)
        assert library_time(ib, p, row.size) * 1e6 == pytest.approx(row.time_us, rel=0.08)
    four = busbw_gbps(32, 1 << 30, library_time(ib, 32, 1 << 30))
    assert (
        four
        < ib.nics_per_node * ib.inter.bandwidth_gbps
        < busbw_gbps(16, 1 << 30, library_time(ib, 16, 1 << 30))
    )


def test_small_messages_pay_a_network_hop_per_tree_level() -> None:
    """NCCL's tree crosses the network 2 log2(m) times: 4 KiB on 4 nodes (held out) costs more
    than on 2 by about two network hops of LL (5 us each), as published (42 vs 30 us)."""
    ib = load_topology("h100_ib")
    two, four = (library_time(ib, p, 4096) * 1e6 for p in (16, 32))
    assert four - two == pytest.approx(2 * 5.0, rel=0.3)
    assert four == pytest.approx(_row("NCCLT309_4N", 4096).time_us, rel=0.1)


def test_oneshot_twoshot_crossovers() -> None:
    """vLLM's and SGLang's one-shot limits and every limit at 2 and 4 ranks are within a
    factor of 2 of the model's crossover. TensorRT-LLM's limit at 8 ranks (about 500 KB, also
    in SGLang's TRT-derived kernel) is 2.1-2.2x the predicted 240 KB: the goal is not met for
    those four rows, and this pins the reported ratio (results/published/CHECK.md)."""
    ratios = crossover_ratios(load_topology("h100_nvlink"))
    assert len(ratios) == 13
    trt_ws8 = [
        c
        for c in ratios
        if c["world_size"] == 8
        and c["source_id"] in ("TRTLLM_PLUGIN_OLD", "TRTLLM_LUT", "SGL_TRT_REDUCE")
    ]
    assert len(trt_ws8) == 4 and all(0.45 < c["ratio"] < 0.5 for c in trt_ws8)
    for c in ratios:
        if c not in trt_ws8:
            assert 0.5 <= c["ratio"] <= 2.0, c
    two = [c for c in ratios if c["world_size"] == 2]
    assert two and all(math.isinf(c["predicted"]) for c in two)  # one-shot at any size
