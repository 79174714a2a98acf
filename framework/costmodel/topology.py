"""Topologies: the links, library model and fitted constants of a machine, read from
``conf/topology/*.yaml`` (package data: ``commlab_conf``) or a path, and written back."""

from __future__ import annotations

import importlib.resources
import math
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
        return Path(__file__).resolve().parents[2] / "conf" / "topology"


TOPOLOGY_DIR = _topology_dir()


@dataclass
class Link:
    alpha_s: float  # per-message latency (s)
    beta_s_per_byte: float  # 1 / bandwidth (s per byte)

    @property
    def bandwidth_gbps(self) -> float:
        return 1e-9 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf


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
    peak_tflops: float = 0.0  # dense matmul peak of one device at the model's dtype
    matmul_efficiency: float = 1.0  # share of that peak a large matmul reaches
    kernel_s: float = 0.0  # fixed cost of one more kernel on the device (launch gap, ramp)
    comm_sm_share: float = 0.0  # share of the device's SMs a collective's kernel holds
    nics_per_node: int = 1  # inter-node NICs per node, one library channel each (rails)
    # library collectives follow NCCL's tuning model (costmodel.nccl) with these fitted shares;
    # empty: the link formulas (alpha-beta)
    nccl: dict[str, float] = field(default_factory=dict)
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
        peak_tflops=float(d.get("peak_tflops", 0.0)),
        matmul_efficiency=float(d.get("matmul_efficiency", 1.0)),
        kernel_s=float(d.get("kernel_s", 0.0)),
        comm_sm_share=float(d.get("comm_sm_share", 0.0)),
        nics_per_node=int(d.get("nics_per_node", 1)),
        nccl={k: float(v) for k, v in (d.get("nccl") or {}).items()},
        custom_ar=_link(d["custom_ar"]) if d.get("custom_ar") else None,
        custom_base_s=float((d.get("custom_ar") or {}).get("base_s", 0.0)),
        fits={k: {kk: float(vv) for kk, vv in v.items()} for k, v in (d.get("fits") or {}).items()},
        sources=dict(d.get("sources") or {}),
    )


def _link(d: dict[str, Any]) -> Link:
    """A link; its alpha may be left out where NCCL's model gives the latencies (presets)."""
    return Link(float(d.get("alpha_s", 0.0)), 1e-9 / float(d["bandwidth_gbps"]))


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
        "peak_tflops": topo.peak_tflops,
        "matmul_efficiency": topo.matmul_efficiency,
        "kernel_s": topo.kernel_s,
        "comm_sm_share": topo.comm_sm_share,
        "nics_per_node": topo.nics_per_node,
        "nccl": topo.nccl,
        "fits": topo.fits,
        "sources": topo.sources,
    }
    return yaml.safe_dump(d, sort_keys=False)
