"""NCCL's own tuning model of its collectives: what the GPU presets predict the library does.

Per call NCCL estimates ``latency + bytes / bandwidth`` for each algorithm (ring, tree) and
protocol (LL, LL128, Simple) and runs the cheapest (``src/graph/tuning.cc``; the constants
below are those of v2.26.2, the version of the 2- and 4-node tables in ``results/published``).
This module keeps that estimate's form and NCCL's constants; a preset supplies its links, a
start-up per call (``base_s``) and, across nodes, one share it fits (``Topology.nccl``):

* ring over p ranks on m nodes of g: ``S = 2(p-1)`` steps, of which ``I = 2(m-1)`` cross the
  network: ``base + (S - I) hop_nvlink + I hop_net + 2(p-1)/p n / busbw``; across nodes a
  step inside a node costs at least NCCL's network overhead (1 us, 3 us at Simple).
* tree (a chain inside each node, a tree across nodes):
  ``base + 2((g-1) hop_nvlink + log2(m) hop_net) + n / (busbw / 2)``.
* busbw: the node's own (NVLink) on one node; on two, the node's unless the NICs carry less:
  two nodes only exchange, each NIC carrying half what a ring's would (NCCL models them with
  the intra-node bandwidth, ``nNodes <= 2 ? bwIntra : bwInter``, and doubles NVLS-tree's
  network bandwidth there); on more, the NICs' (``nics_per_node`` x per-NIC), never above
  the node's, and the tree half of that (NCCL's NVLS-tree rule, ``bwInter/2``). Each
  (algorithm, protocol) gets its share; LL's bus bandwidth is capped (``llMaxBws``: 141 GB/s
  on one node, 39 on two, 20.4 on more, Hopper / Intel hosts).
* fitted across nodes (``Topology.nccl``): ``ll128_share``, the part of NCCL's assumed
  bandwidth LL128 reaches over the network (about half on the 2-node table: the medium sizes,
  where LL128 runs, are slower than NCCL's estimate, as its own tree correction factors say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from framework.costmodel.topology import Topology


@dataclass(frozen=True)
class Cost:
    """One (algorithm, protocol) entry of NCCL's tuning model (microseconds, busbw share)."""

    base_us: float
    nvlink_hop_us: float
    net_hop_us: float
    share: float


# tuning.cc v2.26.2: baseLat, hwLat[NVLINK], hwLat[NET] and the busBw refinements
TUNING = {
    ("ring", "LL"): Cost(6.6, 0.6, 2.7, 0.5),
    ("ring", "LL128"): Cost(14.0, 1.9, 4.0, 0.92),
    ("ring", "Simple"): Cost(8.4, 3.4, 14.0, 1.0),
    ("tree", "LL"): Cost(6.8, 0.6, 5.0, 0.92 / 3.8),
    ("tree", "LL128"): Cost(14.0, 1.25, 8.5, 0.92 * 120 / 128),
    ("tree", "Simple"): Cost(8.4, 4.0, 14.0, 0.92),
}
LL_MAX_BUSBW_GBPS = (141.0, 39.0, 20.4)  # one node, two, more (llMaxBws, Hopper / Intel)
NET_OVERHEAD_US = 1.0  # getNetOverhead on x86 Intel hosts; x3 at Simple
PROTOCOLS = ("LL", "LL128", "Simple")


def layout(topo: Topology, p: int) -> tuple[int, int]:
    """(ranks per node g, nodes m) of ``p`` ranks filling nodes in order."""
    g = max(1, min(p, topo.ranks_per_node))
    return g, math.ceil(p / g)


def link_busbw_gbps(topo: Topology, p: int) -> float:
    """The bus bandwidth a ring of ``p`` ranks sees before the protocol's share."""
    _, m = layout(topo, p)
    if m == 1:
        return topo.intra.bandwidth_gbps
    nics = topo.nics_per_node * topo.inter.bandwidth_gbps
    return min(topo.intra.bandwidth_gbps, 2 * nics if m == 2 else nics)


def _busbw(topo: Topology, algorithm: str, protocol: str, p: int) -> float:
    _, m = layout(topo, p)
    bw = link_busbw_gbps(topo, p) * TUNING[algorithm, protocol].share
    if m > 2 and algorithm == "tree":  # NVLS-tree beyond two nodes: bwInter / 2
        bw /= 2
    if m > 1 and protocol == "LL128":
        bw *= topo.nccl.get("ll128_share", 1.0)
    if protocol == "LL":
        bw = min(bw, LL_MAX_BUSBW_GBPS[min(m, 3) - 1])
    return bw


def ring_time(topo: Topology, p: int, n: float, op: str = "all_reduce") -> float:
    """Seconds for NCCL's ring at its fastest protocol; ``op`` all_reduce (2(p-1) steps),
    reduce_scatter or all_gather (p-1 steps; ``n`` the whole buffer, as nccl-tests counts)."""
    if p <= 1:
        return 0.0
    _, m = layout(topo, p)
    rounds = 2 if op == "all_reduce" else 1
    steps, inter = rounds * (p - 1), rounds * (m - 1)
    return min(
        _ring(topo, protocol, p, n, steps, inter, rounds * (p - 1) / p) for protocol in PROTOCOLS
    )


def _ring(
    topo: Topology, protocol: str, p: int, n: float, steps: int, inter: int, share: float
) -> float:
    c = TUNING["ring", protocol]
    hop = c.nvlink_hop_us
    if inter:  # a step inside a node still pays the network proxy's overhead
        hop = max(hop, NET_OVERHEAD_US * (3 if protocol == "Simple" else 1))
    lat_us = c.base_us + (steps - inter) * hop + inter * c.net_hop_us
    return topo.base_s + lat_us * 1e-6 + share * n / (_busbw(topo, "ring", protocol, p) * 1e9)


def tree_time(topo: Topology, p: int, n: float) -> float:
    """Seconds for NCCL's tree all-reduce at its fastest protocol."""
    if p <= 1:
        return 0.0
    g, m = layout(topo, p)
    out = math.inf
    for protocol in PROTOCOLS:
        c = TUNING["tree", protocol]
        lat_us = c.base_us + 2 * (
            (g - 1) * c.nvlink_hop_us + math.floor(math.log2(m)) * c.net_hop_us
        )
        algbw = _busbw(topo, "tree", protocol, p) / 2
        out = min(out, topo.base_s + lat_us * 1e-6 + n / (algbw * 1e9))
    return out


def nccl_time(topo: Topology, p: int, n: float) -> float:
    """NCCL's all-reduce: the faster of its ring and tree, as its tuner picks."""
    return min(ring_time(topo, p, n), tree_time(topo, p, n))


@dataclass(frozen=True)
class Step:
    """One protocol's costs for an algorithm built of the library's point-to-point steps
    (commlab's tree and hierarchical on a GPU preset): NCCL's ring constants."""

    start_s: float
    nvlink_hop_s: float
    net_hop_s: float
    share: float  # of the link bandwidth


def steps(topo: Topology) -> list[Step]:
    return [
        Step(topo.base_s + c.base_us * 1e-6, c.nvlink_hop_us * 1e-6, c.net_hop_us * 1e-6, c.share)
        for c in (TUNING["ring", protocol] for protocol in PROTOCOLS)
    ]
