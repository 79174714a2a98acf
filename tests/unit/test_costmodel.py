"""The cost model's formulas and fits (pure math; its agreement with measurement on this host,
and the studies built on it, are in ``test_studies.py``)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from framework.costmodel import (
    TOPOLOGY_DIR,
    DecodeShape,
    add_insitu,
    allreduce_time,
    busbw_gbps,
    decode_step,
    features,
    fit,
    fused_time,
    host_features,
    load_topology,
    nccl,
)


def test_naive_ring_reaches_link_bandwidth_and_tree_wins_small_messages_at_scale() -> None:
    nv = load_topology("h100_nvlink")
    t = allreduce_time(nv, "naive", 8, 1 << 30)
    # within the Simple protocol's start-up cost (68 us of 4 ms)
    assert busbw_gbps(8, 1 << 30, t) == pytest.approx(nv.intra.bandwidth_gbps, rel=0.02)
    ib = load_topology("h100_ib")
    small, large = 16 << 10, 1 << 30
    assert allreduce_time(ib, "tree", 256, small) < allreduce_time(ib, "naive", 256, small)
    assert allreduce_time(ib, "tree", 256, large) > allreduce_time(ib, "naive", 256, large)
    # hierarchical sends one rank per node over the slow link: fewer latency steps than a ring
    assert allreduce_time(ib, "hierarchical", 64, small) < allreduce_time(ib, "naive", 64, small)


def test_features_match_the_published_step_counts() -> None:
    assert features("naive", 8, 800) == (14, 1400)  # 2(p-1) steps, 2(p-1)/p n bytes
    lat, _ = features("tree", 1024, 100, chunk=1 << 20)
    assert lat == 2 * math.log2(1024)  # one chunk: 2 log2 p steps
    assert features("naive", 1, 800) == (0, 0)


def test_fusion_pays_for_small_messages_only() -> None:
    nv = load_topology("h100_nvlink")
    k = 8
    assert fused_time(nv, "naive", 8, 4 << 10, k) < k * allreduce_time(nv, "naive", 8, 4 << 10)
    big = 256 << 20
    assert fused_time(nv, "naive", 8, big, k) > k * allreduce_time(nv, "naive", 8, big)


def test_decode_step_is_weight_streaming_plus_exposed_comm() -> None:
    nv = load_topology("h100_nvlink")
    shape = DecodeShape(hidden_size=8192, num_layers=80, params=70e9, batch=8)
    d = decode_step(nv, "naive", 8, shape)
    assert d["compute_s"] == pytest.approx(70e9 * 2 / 8 / 3350e9)
    assert d["comm_s"] == pytest.approx(160 * allreduce_time(nv, "naive", 8, 8 * 8192 * 2))
    assert decode_step(nv, "naive", 8, shape, overlap=1.0)["exposed_s"] <= d["comm_s"]


def test_insitu_extra_is_added_to_every_decode_allreduce() -> None:
    host = load_topology("this_host")
    shape = DecodeShape(hidden_size=192, num_layers=2, params=1e6, batch=4, dtype_bytes=4)
    host.fits["naive"]["insitu_s"] = 0.0
    plain = decode_step(host, "naive", 2, shape, compute_s=1e-3)
    host.fits["naive"]["insitu_s"] = 1e-4
    extra = decode_step(host, "naive", 2, shape, compute_s=1e-3)
    assert extra["comm_s"] - plain["comm_s"] == pytest.approx(4 * 1e-4)
    assert decode_step(host, "naive", 1, shape, compute_s=1e-3)["comm_s"] == 0.0


def test_insitu_is_inloop_cost_minus_model_time() -> None:
    host = load_topology("this_host")
    t = allreduce_time(host, "tree", 2, 4096)
    rows = [{"strategy": "tree", "world_size": 2, "size": 4096, "cost_us": (t + 3e-4) * 1e6}]
    assert add_insitu(host, rows).fits["tree"]["insitu_s"] == pytest.approx(3e-4)
    bare = load_topology("this_host")
    for f in bare.fits.values():
        f.pop("insitu_s", None)
    assert "insitu_s" not in add_insitu(bare, []).fits["tree"]  # nothing measured, nothing set


def test_topology_fits_must_name_an_algorithm_the_model_has(tmp_path) -> None:
    """A fit under any other key (the old name ``ring`` for naive) would be silently ignored."""
    text = (TOPOLOGY_DIR / "this_host.yaml").read_text()
    assert "  naive:\n" in text
    path = tmp_path / "old.yaml"
    path.write_text(text.replace("  naive:\n", "  ring:\n"))
    with pytest.raises(ValueError, match="unknown algorithms \\['ring'\\]"):
        load_topology(path)


def test_fit_recovers_known_constants() -> None:
    alpha, over_alpha, beta, over = 40e-6, 300e-6, 2e-10, 100e-6

    def t(p: int, n: float) -> float:
        lat, over_lat, byt = host_features("naive", p, n, cores=4)
        return alpha * lat + over_alpha * over_lat + beta * byt + over

    rows = [(p, n, t(p, n)) for p in (2, 3, 4, 8) for n in (1e3, 1e5, 1e7)]
    got = fit(rows, "naive", cores=4)
    assert got["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert got["alpha_over_s"] == pytest.approx(over_alpha, rel=1e-6)
    assert got["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    assert got["overhead_s"] == pytest.approx(over, rel=1e-6)
    # without oversubscribed rows there is nothing to fit alpha_over on
    assert fit([r for r in rows if r[0] <= 4], "naive", cores=4)["alpha_over_s"] == 0.0


def test_nccl_ring_crosses_the_network_once_per_node_boundary() -> None:
    """NCCL's ring: 2(p-1) steps of which 2(m-1) cross the network; across nodes a step inside
    a node costs at least the network overhead (1 us at LL). An empty message: LL's latency."""
    ib = load_topology("h100_ib")
    one_node = 6.6 + 14 * 0.6  # base + 14 NVLink hops at 0.6 us
    four_nodes = 6.6 + (62 - 6) * 1.0 + 6 * 2.7
    assert nccl.ring_time(ib, 8, 0) == pytest.approx(ib.base_s + one_node * 1e-6)
    assert nccl.ring_time(ib, 32, 0) == pytest.approx(ib.base_s + four_nodes * 1e-6)


def test_nccl_tree_pays_a_network_hop_each_way_per_doubling_of_nodes() -> None:
    ib = load_topology("h100_ib")
    t = [nccl.tree_time(ib, 8 * m, 0) for m in (2, 4, 8)]
    assert t[1] - t[0] == pytest.approx(2 * 5.0e-6)  # LL's network hop, up and down
    assert t[2] - t[1] == pytest.approx(2 * 5.0e-6)


def test_nccl_bandwidth_is_the_nodes_on_two_nodes_and_the_nics_beyond() -> None:
    ib = load_topology("h100_ib")
    node, nic = ib.intra.bandwidth_gbps, ib.inter.bandwidth_gbps
    assert nccl.link_busbw_gbps(ib, 8) == node
    assert nccl.link_busbw_gbps(ib, 16) == min(node, 2 * 8 * nic) == node  # 752 GB/s of NICs
    assert nccl.link_busbw_gbps(ib, 32) == 8 * nic < node
    half = dataclasses.replace(ib, ranks_per_node=4, nics_per_node=4)  # two nodes of 4
    assert nccl.link_busbw_gbps(half, 8) == 2 * 4 * nic < node
