"""Fitting a host's constants from measurements (``experiments.calibrate`` measures, these
fit) and the errors of the model against measured rows."""

from __future__ import annotations

import os
import statistics
from typing import Any

from framework.costmodel.formulas import allreduce_time, host_features, insitu_time
from framework.costmodel.topology import ALGORITHMS, Link, Topology


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
