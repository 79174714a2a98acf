"""The cost model's GPU presets against published H100 measurements (results/published/).

Pure computation over committed CSVs; ``python -m experiments.published`` writes the same
comparison to ``results/published/CHECK.md``.
"""

from __future__ import annotations

import math

import pytest

from experiments.published import (
    CHECK_SOURCES,
    crossover_ratios,
    fit_custom_ar,
    fit_presets,
    load_tables,
    preset_error,
    table_errors,
)
from framework.costmodel import library_time, load_topology


@pytest.mark.parametrize("preset", sorted(CHECK_SOURCES))
def test_presets_within_25_percent_of_published_tables(preset: str) -> None:
    rows = load_tables()
    topo = load_topology(preset)
    per_table = table_errors(topo, rows, CHECK_SOURCES[preset])
    assert set(per_table) == set(CHECK_SOURCES[preset])  # every table has rows in the window
    assert preset_error(topo, rows, CHECK_SOURCES[preset]) <= 0.25, per_table


def test_presets_are_what_the_fit_gives() -> None:
    """The YAML constants are reproducible: ``experiments.published --fit`` gives them."""
    fitted = fit_presets()
    for name, topo in fitted.items():
        shipped = load_topology(name)
        link = "intra" if name == "h100_nvlink" else "inter"
        for attr in ("alpha_s", "beta_s_per_byte"):
            got, want = getattr(getattr(topo, link), attr), getattr(getattr(shipped, link), attr)
            assert got == pytest.approx(want, rel=0.02), (name, link, attr)
        for proto, p in topo.protocols.items():
            assert p.base_s == pytest.approx(shipped.protocols[proto].base_s, rel=0.02)
            assert p.bandwidth_factor == pytest.approx(
                shipped.protocols[proto].bandwidth_factor, rel=0.02
            )
    ar = fit_custom_ar()
    shipped = load_topology("h100_nvlink").custom_ar
    assert ar["alpha_s"] == pytest.approx(shipped.alpha_s, rel=0.02)
    assert ar["bandwidth_gbps"] == pytest.approx(shipped.bandwidth_gbps, rel=0.02)


def test_multinode_large_messages_use_every_nic() -> None:
    """The old preset sent the ring through one 47 GB/s NIC and was 5-8x too slow at 1 GiB."""
    ib = load_topology("h100_ib")
    row = next(
        r for r in load_tables() if r.source_id == "NCCLT309_XE9680_2N" and r.size == 1 << 30
    )
    assert library_time(ib, 16, row.size) * 1e6 == pytest.approx(row.time_us, rel=0.25)


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
