"""The alpha-beta-gamma formulas: time of each algorithm, collective and schedule on a
topology, and of a TP decode step (pure math)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from framework.costmodel import nccl
from framework.costmodel.topology import ALGORITHMS, OP_KEYS, PEER_ALGORITHMS, Topology


# -- features: time = alpha * latency_terms + beta * byte_terms (+ gamma * reduce_bytes) ------
def features(
    algorithm: str, p: int, n: float, chunk: float = 1 << 20, cores: int | None = None
) -> tuple[float, float]:
    """(number of latency terms, bytes on the critical path) of one all-reduce of ``n`` bytes.

    Linear in alpha and beta, so calibration is ordinary least squares on these features.
    With ``cores`` < p (more ranks than cores on one host) the p ranks' copies and sums share
    fewer cores, so the byte term stretches by p / cores; the latency terms are split out by
    :func:`host_features`.
    """
    lat, byt = _features(algorithm, p, n, chunk)
    if cores and p > cores:
        byt *= p / cores
    return lat, byt


def host_features(
    algorithm: str, p: int, n: float, chunk: float = 1 << 20, cores: int | None = None
) -> tuple[float, float, float]:
    """(latency terms, latency terms paid oversubscribed, bytes) for a fitted host model.

    When ranks outnumber cores, a latency step usually waits for a peer that is not running
    and must first be scheduled: a wake-up of roughly fixed cost per step, whether one rank or
    several are waiting for a core. So oversubscribed steps get their own fitted constant
    (``alpha_over_s``, added to alpha) instead of a p / cores stretch; on this 2-core host that
    predicts world size 3 from fits on 2 and 4 about twice as well (13-24% median error
    against 24-39% on three calibrations).
    """
    lat, byt = features(algorithm, p, n, chunk, cores)
    return lat, (lat if cores and p > cores else 0.0), byt


def _features(algorithm: str, p: int, n: float, chunk: float) -> tuple[float, float]:
    if p <= 1:
        return 0.0, 0.0
    if algorithm == "naive":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p * n
    if algorithm == "tree":
        depth = math.floor(math.log2(p))
        k = max(1, math.ceil(n / chunk))
        c = n / k
        return 2.0 * (depth + k - 1), 4.0 * (depth + k - 1) * c
    if algorithm == "shm":
        # two barriers per chunk, each waiting on p-1 peers (with more ranks than cores every
        # peer may need a context switch first); copy in, sum p slices of n/p, copy out
        k = max(1, math.ceil(n / chunk))
        return 2.0 * k * (p - 1), (3.0 + 1.0 / p) * n
    if algorithm == "hierarchical":  # all ranks one node (g = p): a tree reduce + broadcast
        return _features("tree", p, n, chunk)
    if algorithm in ("naive/reduce_scatter", "naive/all_gather"):  # half a ring all-reduce
        return p - 1.0, (p - 1) / p * n
    if algorithm == "shm/reduce_scatter":  # per round two barriers; copy in, sum my part
        return 2.0 * (p - 1) * max(1, math.ceil(n / chunk)), (2.0 + 1.0 / p) * n
    if algorithm == "shm/all_gather":  # per round two barriers; copy my part in, all out
        return 2.0 * (p - 1) * max(1, math.ceil(n / p / chunk)), (1.0 + 1.0 / p) * n
    if algorithm == "oneshot":  # gather p inputs ((p-1) n received), then sum them (p n read)
        return p - 1.0, (2.0 * p - 1.0) * n
    if algorithm == "twoshot":  # a reduce-scatter and an all-gather of the result
        return 2.0 * (p - 1), 2.0 * (p - 1) / p * n
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {ALGORITHMS + OP_KEYS}")


def allreduce_time(
    topo: Topology, algorithm: str, p: int, n: float, *, chunk: float = 1 << 20
) -> float:
    """Predicted seconds for one all-reduce of ``n`` bytes over ``p`` ranks."""
    if p <= 1:
        return 0.0
    if algorithm in topo.fits:  # calibrated on this machine: the algorithm's own constants
        f = topo.fits[algorithm]
        lat, over, byt = host_features(algorithm, p, n, chunk, topo.cores)
        return (
            f["alpha_s"] * lat
            + f.get("alpha_over_s", 0.0) * over
            + f["beta_s_per_byte"] * byt
            + f.get("overhead_s", 0.0)
        )
    if algorithm in PEER_ALGORITHMS:
        return _peer(topo, algorithm, p, n)
    if topo.nccl:  # a GPU preset: every step at NCCL's per-protocol costs
        return _on_nccl(topo, algorithm, p, n, chunk)
    if algorithm == "hierarchical":
        return _hierarchical(topo, p, n, topo.ranks_per_node, chunk)
    alpha, beta = _library_link(topo, p)
    lat, byt = features(algorithm if algorithm != "shm" else "naive", p, n, chunk)
    reduce = (p - 1) / p * n if algorithm == "naive" else n
    return topo.base_s + alpha * lat + beta * byt + topo.gamma_s_per_byte * reduce


def _on_nccl(topo: Topology, algorithm: str, p: int, n: float, chunk: float) -> float:
    """naive (the library's ring; shm has no GPU form and is costed as it) is NCCL's ring;
    tree and hierarchical pay NCCL's per-protocol start-up and hop latencies on their own
    steps and bytes: tree over the link a ring of p would see, hierarchical a tree inside the
    node (NVLink) and the leaders' ring through one NIC each."""
    if algorithm in ("naive", "shm"):
        return nccl.ring_time(topo, p, n)
    g, m = nccl.layout(topo, p)
    if algorithm == "tree":
        lat, byt = features("tree", p, n, chunk)
        bw = nccl.link_busbw_gbps(topo, p) * 1e9
        return min(
            s.start_s + (s.net_hop_s if m > 1 else s.nvlink_hop_s) * lat + byt / (bw * s.share)
            for s in nccl.steps(topo)
        )
    t_lat, t_byt = features("tree", g, n, chunk)
    r_lat, r_byt = features("naive", m, n)
    node, nic = topo.intra.bandwidth_gbps * 1e9, topo.inter.bandwidth_gbps * 1e9
    return min(
        s.start_s
        + s.nvlink_hop_s * t_lat
        + t_byt / (node * s.share)
        + s.net_hop_s * r_lat
        + r_byt / (nic * s.share)
        for s in nccl.steps(topo)
    )


def collective_time(topo: Topology, op: str, p: int, n: float) -> float:
    """The library's ``op`` on ``n`` bytes (the whole buffer, as nccl-tests counts it): the
    all-reduce as :func:`library_time`; reduce-scatter and all-gather as rings, (p-1) steps
    moving (p-1)/p n bytes (each is half a ring all-reduce), on a GPU preset NCCL's."""
    if op == "all_reduce":
        return library_time(topo, p, n)
    if p <= 1:
        return 0.0
    if topo.nccl:
        return nccl.ring_time(topo, p, n, op)
    alpha, beta = _library_link(topo, p)
    reduce = (p - 1) / p * n if op == "reduce_scatter" else 0.0
    return topo.base_s + alpha * (p - 1) + beta * (p - 1) / p * n + topo.gamma_s_per_byte * reduce


def sequence_parallel_forward(
    topo: Topology, p: int, tokens: int, hidden: int, layers: int, dtype_bytes: int = 2
) -> dict[str, float]:
    """One forward's communication and norm/residual work, all-reduce TP against sequence
    parallelism (seconds). SP replaces each all-reduce by a reduce-scatter and an all-gather
    of the same bytes (tokens padded to a multiple of p) plus one all-gather before the head,
    and does the norms and residual adds (about 6 passes over tokens x hidden per layer at
    HBM bandwidth) on 1/p of the tokens."""
    n = tokens * hidden * dtype_bytes
    padded = -(-tokens // p) * p * hidden * dtype_bytes
    comm_ar = 2 * layers * collective_time(topo, "all_reduce", p, n)
    comm_sp = 2 * layers * (
        collective_time(topo, "reduce_scatter", p, padded)
        + collective_time(topo, "all_gather", p, padded)
    ) + collective_time(topo, "all_gather", p, padded)
    passes = 6 * layers
    elem_ar = passes * n / (topo.hbm_gbps * 1e9) if topo.hbm_gbps else 0.0
    elem_sp = passes * padded / p / (topo.hbm_gbps * 1e9) if topo.hbm_gbps else 0.0
    return {
        "comm_ar_s": comm_ar,
        "comm_sp_s": comm_sp,
        "elementwise_ar_s": elem_ar,
        "elementwise_sp_s": elem_sp,
        "ar_s": comm_ar + elem_ar,
        "sp_s": comm_sp + elem_sp,
    }


def _library_link(topo: Topology, p: int) -> tuple[float, float]:
    """(alpha, beta) of a library ring or tree over ``p`` ranks: the node's links inside a
    node; across nodes one channel per NIC, never faster than the links inside a node."""
    if p <= topo.ranks_per_node:
        return topo.intra.alpha_s, topo.intra.beta_s_per_byte
    beta = max(topo.inter.beta_s_per_byte / topo.nics_per_node, topo.intra.beta_s_per_byte)
    return topo.inter.alpha_s, beta


def library_time(topo: Topology, p: int, n: float) -> float:
    """The library all-reduce as its tuner runs it, what published nccl-tests tables measure:
    on a GPU preset NCCL's own model (:mod:`.nccl`), else the faster of ring and tree."""
    if topo.nccl:
        return nccl.nccl_time(topo, p, n)
    return min(allreduce_time(topo, a, p, n) for a in ("naive", "tree"))


def _hierarchical(topo: Topology, p: int, n: float, g: int, chunk: float) -> float:
    g = max(1, min(g, p))
    m = math.ceil(p / g)
    t = topo.base_s + topo.gamma_s_per_byte * n
    if g > 1:  # reduce to the leader and broadcast back: a tree each way on the intra link
        lat, byt = features("tree", g, n, chunk)
        t += topo.intra.alpha_s * lat + topo.intra.beta_s_per_byte * byt
    if m > 1:  # the leaders' ring on the inter-node link, one NIC per leader
        lat, byt = features("naive", m, n)
        t += topo.inter.alpha_s * lat + topo.inter.beta_s_per_byte * byt
    return t


def _peer(topo: Topology, algorithm: str, p: int, n: float) -> float:
    link = topo.custom_ar
    if link is None:
        raise ValueError(f"topology {topo.name!r} has no custom_ar constants for {algorithm}")
    if p > topo.ranks_per_node:
        raise ValueError(f"{algorithm} needs peer memory: p={p} spans several nodes")
    if algorithm == "oneshot":
        return topo.custom_base_s + link.alpha_s + (p - 1) * n * link.beta_s_per_byte
    return topo.custom_base_s + 2 * link.alpha_s + 2 * (p - 1) / p * n * link.beta_s_per_byte


def oneshot_crossover(topo: Topology, p: int) -> float:
    """Bytes above which two-shot beats one-shot (``inf``: never, as at p = 2, where
    two-shot moves as many bytes as one-shot and pays a second stage)."""
    link = topo.custom_ar
    if link is None:
        raise ValueError(f"topology {topo.name!r} has no custom_ar constants")
    saved_per_byte = ((p - 1) - 2 * (p - 1) / p) * link.beta_s_per_byte
    return link.alpha_s / saved_per_byte if saved_per_byte > 0 else math.inf


def insitu_time(topo: Topology, algorithm: str, p: int) -> float:
    """Extra seconds an all-reduce costs when it follows compute (see the module docstring);
    none on one rank, where there is no all-reduce."""
    return topo.fits.get(algorithm, {}).get("insitu_s", 0.0) if p > 1 else 0.0


def fused_time(topo: Topology, algorithm: str, p: int, n: float, k: int) -> float:
    """``k`` messages of ``n`` bytes fused into one bucket: one collective plus packing."""
    pack = 2.0 * k * n / (topo.copy_gbps * 1e9)
    return allreduce_time(topo, algorithm, p, k * n) + pack


def exposed_time(comm_s: float, overlappable_compute_s: float) -> float:
    return max(0.0, comm_s - overlappable_compute_s)


def busbw_gbps(p: int, n: float, t: float, op: str = "all_reduce") -> float:
    """nccl-tests' bus bandwidth in GB/s: algbw = n / t times the op's factor, 2(p-1)/p for
    all-reduce, (p-1)/p for reduce-scatter and all-gather (``n``: the whole buffer, the
    reduce-scatter's input or the all-gather's output, as nccl-tests' size column).

    The one definition: the benchmark's busbw column is computed by it too. 0 for one rank
    (nothing crosses a bus) or a zero time."""
    factor = 2 * (p - 1) / p if op == "all_reduce" else (p - 1) / p
    return n / t * factor / 1e9 if t > 0 else 0.0


# -- TP decode ---------------------------------------------------------------------------
@dataclass
class DecodeShape:
    """What one TP decode step moves: from the model config and the workload."""

    hidden_size: int
    num_layers: int
    params: float  # total parameters (weights read once per step per micro-batch)
    batch: int
    micro_batches: int = 1
    dtype_bytes: int = 2

    @property
    def message_bytes(self) -> float:
        return self.batch / self.micro_batches * self.hidden_size * self.dtype_bytes

    @property
    def allreduces(self) -> int:
        return 2 * self.num_layers * self.micro_batches


def decode_step(
    topo: Topology,
    algorithm: str,
    p: int,
    shape: DecodeShape,
    *,
    compute_s: float | None = None,
    overlap: float = 0.0,
    allreduce_s: float | None = None,
) -> dict[str, float]:
    """Predicted decode inter-token latency: compute + exposed all-reduce time.

    Every all-reduce costs its back-to-back time plus the topology's in-situ extra.

    ``compute_s`` is the step's compute time (measured on this host); by default it is the
    weight-streaming bound of a memory-bound decode: weights / p / HBM bandwidth per
    micro-batch. ``overlap`` is the fraction of compute that communication can hide behind.
    ``allreduce_s`` replaces ``algorithm``'s time per all-reduce (a TP layer's choice of
    kernel, :func:`.tp_layer.tp_allreduce_time`).
    """
    if compute_s is None:
        if topo.hbm_gbps <= 0:
            raise ValueError(f"topology {topo.name!r} has no hbm_gbps; pass compute_s")
        compute_s = (
            shape.micro_batches * shape.params * shape.dtype_bytes / p / (topo.hbm_gbps * 1e9)
        )
    per_call = (
        allreduce_s
        if allreduce_s is not None
        else allreduce_time(topo, algorithm, p, shape.message_bytes)
    )
    comm = shape.allreduces * (per_call + insitu_time(topo, algorithm, p))
    exposed = exposed_time(comm, overlap * compute_s)
    return {
        "itl_s": compute_s + exposed,
        "compute_s": compute_s,
        "comm_s": comm,
        "exposed_s": exposed,
    }
