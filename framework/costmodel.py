"""Alpha-beta-gamma cost model of every algorithm and schedule, for extrapolating past this host.

A message of ``n`` bytes over a link costs ``alpha + n * beta`` (latency plus bytes over
bandwidth); summing ``n`` bytes costs ``n * gamma``. The formulas per algorithm, for ``p``
ranks (Thakur, Rabenseifner and Gropp, "Optimization of collective communication operations
in MPICH", IJHPCA 2005; Sanders, Speck and Traeff 2009 for the pipelined tree; NCCL's tuning
model uses the same latency + bytes / bandwidth form per algorithm and protocol):

* ``naive`` (the library's ring all-reduce): reduce-scatter + all-gather,
  ``2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma``. nccl-tests' busbw = algbw * 2(p-1)/p
  is defined so that busbw equals the link bandwidth ``1/beta`` for a perfect ring.
* ``tree`` (binary reduce then broadcast, chunk-pipelined, ``k = ceil(n / c)`` chunks of ``c``
  bytes, depth ``d = floor(log2 p)``): ``2 (d + k - 1) alpha + 2 (d + k - 1) c beta * 2 +
  n gamma`` -- each tree step moves a chunk to or from two children.
* ``hierarchical`` over ``g`` ranks per node and ``m = p/g`` nodes: reduce to the node leader
  (tree on the intra link), ``naive`` ring of the leaders on the inter link, broadcast back.
* across nodes the library's ring and tree run one channel per NIC (a rail-optimised node has a
  NIC per GPU), so their inter-node bandwidth is ``nics_per_node`` times a NIC's; ``hierarchical``
  sends its leaders' ring from one rank per node, through one NIC.
* ``protocols`` (presets): NCCL picks, per message, the fastest of its protocols (LL: low
  latency at part of the bandwidth; Simple: full bandwidth after a longer start-up), each with
  its own base latency and share of the link bandwidth (NCCL's ``src/graph/tuning.cc`` has the
  same form). A library collective costs the minimum over the topology's protocols;
  :func:`library_time` also takes the faster of ring and tree, as NCCL's tuner does.
* ``oneshot`` / ``twoshot`` (the custom all-reduce kernels of vLLM, SGLang and TensorRT-LLM over
  NVLink peer memory, constants ``custom_ar``): one-shot reads every peer's whole input in one
  stage, ``base + alpha + (p-1) n beta``; two-shot reduce-scatters then all-gathers,
  ``base + 2 alpha + 2(p-1)/p n beta``. Their crossover :func:`oneshot_crossover` is where the
  second stage's latency equals the bytes it saves.
* ``shm`` (shared memory, one host): per chunk two flag barriers, each waiting on ``p - 1``
  peers (``2 (p-1) alpha``; alpha is the flag round trip, or a context switch when there are
  more ranks than cores) and memory traffic of about ``(3 + 1/p) n`` bytes per rank (copy in,
  sum p slices of n/p, copy out) at memory bandwidth ``1/beta``.

In situ. Benchmarks time all-reduces back to back; in a model each one follows a stretch of
compute. Where the transport runs on the same cores as the compute (gloo or shared memory on
a CPU host), that costs more: the waiting rank has gone to sleep and must be woken, and the
transport's kernel and helper-thread work (TCP loopback, gloo's threads) takes cycles from the
compute around it. ``insitu_s`` in an algorithm's fitted constants is that extra cost per
all-reduce, measured by ``experiments.calibrate`` as a loop of compute segments with and
without an all-reduce after each; :func:`decode_step` adds it to every all-reduce. Presets
leave it 0: on a GPU the collective kernel is queued behind the compute on a stream.

Schedules: fusing ``k`` messages of ``n`` bytes costs one collective of ``k n`` bytes plus a
copy in and out of the bucket (``2 k n / copy_bw``) instead of ``k`` collectives; overlap with
compute leaves ``max(0, comm - overlappable compute)`` exposed.

The constants live in topology files (``conf/topology/*.yaml``): presets from published figures
with the source of each number beside it, and ``this_host``, fitted by
``python -m experiments.calibrate`` from measured all-reduce times (:func:`fit_host`: least
squares of the formula's features per algorithm, so each algorithm gets its own effective alpha
and beta; :func:`add_insitu` adds the in-situ extra).
"""

from __future__ import annotations

import importlib.resources
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The strategies this model has a formula for, by their registry names; schedules (bucketed,
# async_overlap, ...) are predicted through the algorithm they send with (fused_time, overlap).
ALGORITHMS = ("naive", "tree", "hierarchical", "shm")
# GPU custom all-reduce kernels (NVLink peer memory), predicted from a topology's ``custom_ar``
PEER_ALGORITHMS = ("oneshot", "twoshot")
# Fitted on a host like the algorithms (``experiments.calibrate_ops``): the other two ops of
# naive and shm (``<strategy>/<op>``, n = the whole buffer) and the one- and two-shot
# all-reduce strategies (over the library's ops).
OP_KEYS = (
    "naive/reduce_scatter",
    "naive/all_gather",
    "shm/reduce_scatter",
    "shm/all_gather",
    "oneshot",
    "twoshot",
)


def _topology_dir() -> Path:
    """The presets: the installed ``commlab_conf`` package's (conf/ itself in an editable
    install), else the source tree's ``conf/topology`` (a checkout used without installing)."""
    try:
        return Path(str(importlib.resources.files("commlab_conf"))) / "topology"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "conf" / "topology"


TOPOLOGY_DIR = _topology_dir()


@dataclass
class Link:
    alpha_s: float  # per-message latency (s)
    beta_s_per_byte: float  # 1 / bandwidth (s per byte)

    @property
    def bandwidth_gbps(self) -> float:
        return 1e-9 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf


@dataclass
class Protocol:
    """One of the library's protocols: its start-up cost and share of the link bandwidth."""

    base_s: float
    bandwidth_factor: float = 1.0


@dataclass
class Topology:
    """Links of a machine type. ``fits`` (this_host) holds per-algorithm fitted constants
    that replace the link constants for that algorithm."""

    name: str
    ranks_per_node: int
    intra: Link
    inter: Link
    base_s: float = 0.0  # fixed cost of launching one collective
    cores: int | None = None  # CPU cores of a one-host topology (None: one device per rank)
    gamma_s_per_byte: float = 0.0  # reduction arithmetic
    copy_gbps: float = 100.0  # local memory copy bandwidth (bucket packing)
    hbm_gbps: float = 0.0  # device memory bandwidth (decode compute is weight-bound)
    nics_per_node: int = 1  # inter-node NICs per node, one library channel each (rails)
    protocols: dict[str, Protocol] = field(default_factory=dict)  # none: one, base_s
    custom_ar: Link | None = None  # peer-memory all-reduce kernels: alpha per stage, bandwidth
    custom_base_s: float = 0.0  # fixed cost of launching a custom all-reduce kernel
    fits: dict[str, dict[str, float]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def load_topology(name_or_path: str | Path) -> Topology:
    path = Path(name_or_path)
    if not path.suffix:
        path = TOPOLOGY_DIR / f"{name_or_path}.yaml"
    d = yaml.safe_load(path.read_text())
    unknown = sorted(set(d.get("fits") or {}) - set(ALGORITHMS) - set(OP_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: fits for unknown algorithms {unknown}; the model has "
            f"formulas for {list(ALGORITHMS)}"
        )
    return Topology(
        name=d["name"],
        ranks_per_node=int(d["ranks_per_node"]),
        intra=_link(d["intra"]),
        inter=_link(d["inter"]),
        base_s=float(d.get("base_s", 0.0)),
        cores=int(d["cores"]) if d.get("cores") else None,
        gamma_s_per_byte=float(d.get("gamma_s_per_byte", 0.0)),
        copy_gbps=float(d.get("copy_gbps", 100.0)),
        hbm_gbps=float(d.get("hbm_gbps", 0.0)),
        nics_per_node=int(d.get("nics_per_node", 1)),
        protocols={
            k: Protocol(float(v["base_s"]), float(v.get("bandwidth_factor", 1.0)))
            for k, v in (d.get("protocols") or {}).items()
        },
        custom_ar=_link(d["custom_ar"]) if d.get("custom_ar") else None,
        custom_base_s=float((d.get("custom_ar") or {}).get("base_s", 0.0)),
        fits={k: {kk: float(vv) for kk, vv in v.items()} for k, v in (d.get("fits") or {}).items()},
        sources=dict(d.get("sources") or {}),
    )


def _link(d: dict[str, Any]) -> Link:
    return Link(float(d["alpha_s"]), 1e-9 / float(d["bandwidth_gbps"]))


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


def fit(
    rows: list[tuple[int, float, float]],
    algorithm: str,
    chunk: float = 1 << 20,
    cores: int | None = None,
) -> dict[str, float]:
    """Least-squares alpha, alpha_over, beta and a fixed per-call overhead from (p, bytes,
    seconds) rows (:func:`host_features`).

    Relative errors are minimised (each row weighted by 1/t), because times span three orders
    of magnitude and the model must hold for small and large messages alike. A coefficient
    that comes out negative is clamped to 0 and the others refitted.
    """
    import torch

    names = ["alpha_s", "alpha_over_s", "beta_s_per_byte", "overhead_s"]
    x = torch.tensor(
        [[*host_features(algorithm, p, n, chunk, cores), 1.0] for p, n, _ in rows],
        dtype=torch.float64,
    )
    t = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    # a column of zeros (no oversubscribed rows, say) has no constant to fit
    keep = [i for i in range(len(names)) if x[:, i].abs().sum() > 0]
    while True:
        a = x[:, keep] / t[:, None]
        coef = torch.linalg.lstsq(a, torch.ones_like(t)).solution
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(torch.argmin(coef)))
    out = dict.fromkeys(names, 0.0)
    for i, c in zip(keep, coef.tolist()):
        out[names[i]] = max(c, 0.0)
    return out


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
    protocols = list(topo.protocols.values()) or [Protocol(topo.base_s)]
    if algorithm == "hierarchical":
        return min(_hierarchical(topo, p, n, topo.ranks_per_node, chunk, pr) for pr in protocols)
    alpha, beta = _library_link(topo, p)
    lat, byt = features(algorithm if algorithm != "shm" else "naive", p, n, chunk)
    reduce = (p - 1) / p * n if algorithm == "naive" else n
    return min(
        pr.base_s + alpha * lat + beta / pr.bandwidth_factor * byt + topo.gamma_s_per_byte * reduce
        for pr in protocols
    )


def collective_time(topo: Topology, op: str, p: int, n: float) -> float:
    """The library's ``op`` on ``n`` bytes (the whole buffer, as nccl-tests counts it): the
    all-reduce as :func:`library_time`; reduce-scatter and all-gather as rings, (p-1) steps
    moving (p-1)/p n bytes, at the fastest protocol (each is half a ring all-reduce)."""
    if op == "all_reduce":
        return library_time(topo, p, n)
    if p <= 1:
        return 0.0
    alpha, beta = _library_link(topo, p)
    protocols = list(topo.protocols.values()) or [Protocol(topo.base_s)]
    reduce = (p - 1) / p * n if op == "reduce_scatter" else 0.0
    return min(
        pr.base_s
        + alpha * (p - 1)
        + beta / pr.bandwidth_factor * (p - 1) / p * n
        + topo.gamma_s_per_byte * reduce
        for pr in protocols
    )


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
    """The library all-reduce as NCCL's tuner runs it: the faster of ring and tree (each at
    its fastest protocol). What published nccl-tests tables measure."""
    return min(allreduce_time(topo, a, p, n) for a in ("naive", "tree"))


def _hierarchical(topo: Topology, p: int, n: float, g: int, chunk: float, pr: Protocol) -> float:
    g = max(1, min(g, p))
    m = math.ceil(p / g)
    t = pr.base_s + topo.gamma_s_per_byte * n
    if g > 1:  # reduce to the leader and broadcast back: a tree each way on the intra link
        lat, byt = features("tree", g, n, chunk)
        t += topo.intra.alpha_s * lat + topo.intra.beta_s_per_byte / pr.bandwidth_factor * byt
    if m > 1:  # the leaders' ring on the inter-node link, one NIC per leader
        lat, byt = features("naive", m, n)
        t += topo.inter.alpha_s * lat + topo.inter.beta_s_per_byte / pr.bandwidth_factor * byt
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
) -> dict[str, float]:
    """Predicted decode inter-token latency: compute + exposed all-reduce time.

    Every all-reduce costs its back-to-back time plus the topology's in-situ extra.

    ``compute_s`` is the step's compute time (measured on this host); by default it is the
    weight-streaming bound of a memory-bound decode: weights / p / HBM bandwidth per
    micro-batch. ``overlap`` is the fraction of compute that communication can hide behind.
    """
    if compute_s is None:
        if topo.hbm_gbps <= 0:
            raise ValueError(f"topology {topo.name!r} has no hbm_gbps; pass compute_s")
        compute_s = (
            shape.micro_batches * shape.params * shape.dtype_bytes / p / (topo.hbm_gbps * 1e9)
        )
    per_call = allreduce_time(topo, algorithm, p, shape.message_bytes)
    comm = shape.allreduces * (per_call + insitu_time(topo, algorithm, p))
    exposed = exposed_time(comm, overlap * compute_s)
    return {
        "itl_s": compute_s + exposed,
        "compute_s": compute_s,
        "comm_s": comm,
        "exposed_s": exposed,
    }


# -- fitting this host's constants (experiments.calibrate measures, these fit) ----------------
COMPUTE = "compute"  # the strategy label of a measured decode run with no communication


def fit_host(
    rows: list[dict[str, Any]],
    world_sizes: set[int] | None = None,
    copy_gbps: float = 10.0,
    cores: int | None = None,
) -> Topology:
    """A ``this_host`` topology whose per-algorithm constants fit measured ``rows``
    (strategy, world_size, size, time_us), optionally only those of ``world_sizes``."""
    cores = cores or os.cpu_count()
    fits = {}
    for algo in ALGORITHMS:
        data = [
            (r["world_size"], r["size"], r["time_us"] * 1e-6)
            for r in rows
            if r["strategy"] == algo
            and r["world_size"] > 1
            and (world_sizes is None or r["world_size"] in world_sizes)
        ]
        if data:
            fits[algo] = fit(data, algo, cores=cores)
    ring = fits.get("naive", {"alpha_s": 1e-3, "beta_s_per_byte": 1e-9})
    link = Link(ring["alpha_s"], max(ring["beta_s_per_byte"], 1e-15))
    return Topology(
        name="this_host",
        ranks_per_node=max(r["world_size"] for r in rows),
        intra=link,
        inter=link,
        copy_gbps=copy_gbps,
        fits=fits,
        cores=cores,
        sources={
            "fits": "least squares on measured all-reduce times (python -m experiments.calibrate)"
        },
    )


def add_insitu(topo: Topology, inloop: list[dict[str, Any]]) -> Topology:
    """Set each algorithm's ``insitu_s``: the median over sizes of the measured in-loop cost
    (strategy, world_size, size, cost_us) minus the model's back-to-back time for that size."""
    for algo in ALGORITHMS:
        extra = [
            r["cost_us"] * 1e-6 - allreduce_time(topo, algo, r["world_size"], r["size"])
            for r in inloop
            if r["strategy"] == algo
        ]
        if extra and algo in topo.fits:
            topo.fits[algo]["insitu_s"] = statistics.median(extra)
    return topo


def allreduce_errors(topo: Topology, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predicted against measured time of every multi-rank row the model has a formula for."""
    out = []
    for r in rows:
        if r["world_size"] < 2 or r["strategy"] not in ALGORITHMS:
            continue
        meas = r["time_us"] * 1e-6
        pred = allreduce_time(topo, r["strategy"], r["world_size"], r["size"])
        out.append(
            {
                "strategy": r["strategy"],
                "world_size": r["world_size"],
                "size": r["size"],
                "measured_us": meas * 1e6,
                "predicted_us": pred * 1e6,
                "rel_error": abs(pred - meas) / meas,
            }
        )
    return out


def decode_errors(topo: Topology, decode: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predicted against measured decode step: measured compute (the :data:`COMPUTE` run)
    plus, per all-reduce, the model's back-to-back time and in-situ extra."""
    compute = next(d for d in decode if d["strategy"] == COMPUTE)["step_s"]
    out = []
    for d in decode:
        algo = d["strategy"]
        if algo not in ALGORITHMS:
            continue
        insitu = insitu_time(topo, algo, d["world_size"])
        per_call = allreduce_time(topo, algo, d["world_size"], d["message_bytes"]) + insitu
        comm = d["allreduces"] * per_call
        pred = compute + comm
        out.append(
            {
                "strategy": algo,
                "world_size": d["world_size"],
                "measured_s": d["step_s"],
                "predicted_s": pred,
                "compute_s": compute,
                "predicted_comm_s": comm,
                "insitu_s": insitu,
                "measured_exposed_s": d["exposed_s"],
                "rel_error": abs(pred - d["step_s"]) / d["step_s"],
            }
        )
    return out


def median_error(errors: list[dict[str, Any]]) -> float:
    return statistics.median(e["rel_error"] for e in errors) if errors else float("nan")


def to_yaml(topo: Topology) -> str:
    d: dict[str, Any] = {
        "name": topo.name,
        "ranks_per_node": topo.ranks_per_node,
        "intra": {"alpha_s": topo.intra.alpha_s, "bandwidth_gbps": topo.intra.bandwidth_gbps},
        "inter": {"alpha_s": topo.inter.alpha_s, "bandwidth_gbps": topo.inter.bandwidth_gbps},
        "base_s": topo.base_s,
        "cores": topo.cores,
        "gamma_s_per_byte": topo.gamma_s_per_byte,
        "copy_gbps": topo.copy_gbps,
        "hbm_gbps": topo.hbm_gbps,
        "nics_per_node": topo.nics_per_node,
        "fits": topo.fits,
        "sources": topo.sources,
    }
    return yaml.safe_dump(d, sort_keys=False)
