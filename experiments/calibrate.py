"""Fit the cost model's constants on this host and check the model against measurement.

``python -m experiments.calibrate [--world-sizes 2,3,4] [--out-dir results/calibration]``

1. Measures all-reduce times of every strategy the cost model has a formula for
   (``framework.costmodel.ALGORITHMS``: naive, tree, hierarchical, shm) at sizes 1 KiB - 1 MiB
   and world sizes 2, 3, 4, with the benchmark's timing loop (:func:`framework.run.measure.sweep`:
   median over iterations of the slowest rank). ``--runs DIR`` fits bench results already on
   disk (``bench.csv`` files of a bench multirun) instead.
2. Fits per algorithm alpha, beta and a fixed overhead by least squares of relative error
   (:func:`framework.costmodel.fit_host`), adds each algorithm's in-situ extra (step 3,
   :func:`framework.costmodel.add_insitu`) and writes ``conf/topology/this_host.yaml``.
3. Validates: predicted against measured all-reduce time for every row, once with the fit on
   all world sizes and once fitted on world sizes 2 and 4 only and predicting 3 (held out);
   and predicted against measured TP decode step time (tiny model, TP 2). The decode step is
   predicted as compute, measured in a run with no communication, plus per all-reduce the
   model's back-to-back time and its in-situ extra (``insitu_s``, measured in a loop of
   compute segments with and without all-reduces: on a CPU host an all-reduce that follows
   compute costs more than one that follows another all-reduce). All of it is measured in
   interleaved rounds with the decode runs (:func:`measure_decode`): gloo on a shared VM
   drifts by 2-3x over minutes. Writes ``validation.md``, ``validation.json`` and
   ``validation.png`` in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from framework.comm.registry import build_communicator
from framework.costmodel import (
    ALGORITHMS,
    COMPUTE,
    TOPOLOGY_DIR,
    add_insitu,
    allreduce_errors,
    decode_errors,
    fit_host,
    median_error,
    to_yaml,
)
from framework.run.measure import (
    NoComm,
    SweepSpec,
    bench_sizes,
    max_over_ranks,
    memcpy_times,
    sweep,
)
from framework.run.spec import ParallelSpec

STRATEGIES = list(ALGORITHMS)  # what the cost model can predict, so what is worth fitting
# the decode check runs at TP 2 on one host, where hierarchical is a tree: not measured twice
DECODE_STRATEGIES = [s for s in STRATEGIES if s != "hierarchical"]
CPU = torch.device("cpu")
SIZES = SweepSpec(sizes=tuple(bench_sizes(1024, 1 << 20, 4, 4)), iters=10, warmup=2)
DECODE_SIZES = SweepSpec(sizes=tuple(bench_sizes(1024, 16 << 10, 4, 4)), iters=10, warmup=2)


# -- on every rank -------------------------------------------------------------------------
def measure_allreduce(
    strategies: list[str], spec: SweepSpec = SIZES, rounds: int = 5, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    """bench's timing loop for each strategy on this rank's group; rows as in bench.csv.

    ``rounds`` passes over every strategy and size, interleaved, and the median over rounds
    of bench's per-round median: gloo's latency on a shared VM drifts by 2-5x over seconds,
    and interleaving spreads the slow periods over every point instead of a few."""
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    comms = {name: build_communicator(name, timeout_s=timeout_s) for name in strategies}
    try:
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for name, comm in comms.items():
                for r in sweep([comm], spec, rank, world, CPU)["rows"]:
                    times.setdefault((name, r["size"]), []).append(r["time_us"])
    finally:
        for comm in comms.values():
            comm.close()
    return [
        {"strategy": name, "world_size": world, "size": size, "time_us": statistics.median(ts)}
        for (name, size), ts in times.items()
    ]


def measure_decode(
    strategies: list[str],
    new_tokens: int = 24,
    batch: int = 4,
    preset: str = "tiny",
    rounds: int = 5,
    spec: SweepSpec = DECODE_SIZES,
) -> dict[str, Any]:
    """Everything the decode-step check needs, measured in the same interleaved rounds.

    Per round and strategy: bench's back-to-back all-reduce sweep (``spec`` sizes), the
    in-loop cost at the same sizes (:func:`measure_inloop`, with compute segments as long as
    the decode's compute per all-reduce), and a decode run of the model; once per round a
    decode run with no communication at all (:class:`~framework.run.measure.NoComm`), whose
    step time is the compute. Gloo on a shared VM drifts by 2-3x over minutes, so constants
    measured in another phase would not describe the decode runs; interleaving gives every
    quantity the same slow and fast periods.

    Returns ``{"decode": rows, "allreduce": rows, "inloop": rows}``."""
    from framework.model import TPLlama, get_config
    from framework.model.generate import generate

    torch.set_num_threads(1)
    cfg = get_config(preset)
    prompts = [[(7 * i + j) % cfg.vocab_size for j in range(8)] for i in range(batch)]
    rank, world = dist.get_rank(), dist.get_world_size()
    n_ar = 2 * cfg.num_layers
    comms: dict[str, Any] = {name: build_communicator(name) for name in strategies}
    comms[COMPUTE] = NoComm()
    try:
        models = {
            name: TPLlama(cfg, c, rank, world).init_random(seed=0) for name, c in comms.items()
        }
        steps: dict[str, list[list[float]]] = {name: [] for name in comms}
        times: dict[tuple[str, int], list[float]] = {}
        inloop: dict[tuple[str, int], list[float]] = {}
        sizes = list(spec.sizes)
        segment_s = None
        for _ in range(rounds):
            for name, model in reversed(models.items()):  # compute first: it sizes the segment
                if name != COMPUTE:
                    for r in sweep([comms[name]], spec, rank, world, CPU)["rows"]:
                        times.setdefault((name, r["size"]), []).append(r["time_us"] * 1e-6)
                    for size, cost in measure_inloop(comms[name], sizes, segment_s).items():
                        inloop.setdefault((name, size), []).append(cost)
                generate(model, prompts, 2)  # warm-up
                stamps: list[tuple[float, float]] = []
                mark = _marker(stamps, comms[name])
                dist.barrier()
                generate(model, prompts, new_tokens, on_prefill_end=mark, on_step_end=mark)
                steps[name] += [[b[0] - a[0], b[1] - a[1]] for a, b in pairwise(stamps)]
                if name == COMPUTE and segment_s is None:
                    segment_s = _slowest_rank_step(steps[name]) / n_ar
    finally:
        for c in comms.values():
            c.close()
    decode = []
    for name in comms:
        if name == COMPUTE:  # ranks not in lockstep: step i of one is not step i of the other
            decode.append(
                {
                    "strategy": name,
                    "world_size": world,
                    "step_s": _slowest_rank_step(steps[name]),
                    "exposed_s": 0.0,
                    "allreduces": 0,
                    "message_bytes": 0,
                }
            )
            continue
        t = torch.tensor(steps[name], dtype=torch.float64)
        step, wait = t[:, 0].clone(), t[:, 1].clone()
        dist.all_reduce(step, op=dist.ReduceOp.MAX)  # the step ends when the last rank is done
        # The rank that waits least is the one on the critical path: its wait is the
        # transport; the others' extra wait is skew (waiting for its compute), not comm.
        dist.all_reduce(wait, op=dist.ReduceOp.MIN)
        decode.append(
            {
                "strategy": name,
                "world_size": world,
                "step_s": statistics.median(step.tolist()),
                "exposed_s": statistics.median(wait.tolist()),
                "allreduces": n_ar,
                "message_bytes": batch * cfg.hidden_size * 4,
            }
        )
    return {
        "decode": decode,
        "allreduce": [
            {
                "strategy": name,
                "world_size": world,
                "size": size,
                "time_us": statistics.median(ts) * 1e6,
            }
            for (name, size), ts in times.items()
        ],
        "inloop": [
            {
                "strategy": name,
                "world_size": world,
                "size": size,
                "cost_us": statistics.median(cs) * 1e6,
            }
            for (name, size), cs in inloop.items()
        ],
    }


def measure_inloop(
    comm: Any, sizes: list[int], segment_s: float, iters: int = 10, blocks: int = 4
) -> dict[int, float]:
    """Seconds an all-reduce adds to a loop where each one follows ``segment_s`` of compute.

    Alternates blocks of (compute segment, all-reduce) iterations with blocks of the compute
    alone, takes the slowest rank per iteration, and returns per size the difference of the
    medians. The segment after an all-reduce is where its interference lands, so compute and
    all-reduce are not split within an iteration. The compute is small matrix products and
    elementwise ops, the kind a decode step is made of."""
    spin = _Spin(segment_s)
    out = {}
    for size in sizes:
        x = torch.ones(size // 4)
        loops: list[list[float]] = [[], []]
        for _ in range(blocks):
            for i, reduce in enumerate((True, False)):
                dist.barrier()
                for _ in range(iters):
                    t0 = time.perf_counter()
                    spin()
                    if reduce:
                        comm.all_reduce(x).wait()
                    loops[i].append(time.perf_counter() - t0)
        t = max_over_ranks(torch.tensor(loops, dtype=torch.float64))
        out[size] = statistics.median(t[0].tolist()) - statistics.median(t[1].tolist())
    return out


class _Spin:
    """About ``seconds`` of decode-like compute on one thread."""

    def __init__(self, seconds: float) -> None:
        self.a, self.w = torch.randn(4, 192), torch.randn(192, 192)
        t0 = time.perf_counter()
        for _ in range(50):
            self._op()
        per = (time.perf_counter() - t0) / 50
        self.k = max(1, round(seconds / per))

    def _op(self) -> None:
        y = self.a @ self.w
        y = torch.nn.functional.silu(y) * y
        y.div_(y.norm() + 1)

    def __call__(self) -> None:
        for _ in range(self.k):
            self._op()


def _slowest_rank_step(steps: list[list[float]]) -> float:
    """The slowest rank's median step time (for runs whose ranks are not in lockstep)."""
    return max_over_ranks(statistics.median(s for s, _ in steps))


def _marker(stamps: list[tuple[float, float]], comm: Any):
    def mark(*_: Any) -> None:
        stamps.append((time.perf_counter(), comm.stats.wait_s))

    return mark


# -- entry point ---------------------------------------------------------------------------
def _read_runs(paths: list[str]) -> list[dict[str, Any]]:
    from experiments.report import collect

    rows = []
    for p in paths:
        _, bench_rows = collect(Path(p))
        rows += [
            {
                "strategy": r["strategy"],
                "world_size": int(r["world_size"]),
                "size": int(r["size"]),
                "time_us": float(r["time_us"]),
            }
            for r in bench_rows
            if r.get("mode", "single") == "single"
        ]
    return rows


def _plot(errors: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for name in sorted({e["strategy"] for e in errors}):
        es = [e for e in errors if e["strategy"] == name]
        ax.scatter(
            [e["measured_us"] for e in es], [e["predicted_us"] for e in es], label=name, s=14
        )
    lo = min(min(e["measured_us"], e["predicted_us"]) for e in errors)
    hi = max(max(e["measured_us"], e["predicted_us"]) for e in errors)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="measured all-reduce time (us)",
        ylabel="predicted (us)",
        title="cost model vs measurement, this host",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="2,3,4")
    ap.add_argument("--runs", nargs="*", help="bench run/multirun directories to fit instead")
    ap.add_argument("--out-dir", default="results/calibration")
    ap.add_argument("--topology", default=str(TOPOLOGY_DIR / "this_host.yaml"))
    a = ap.parse_args(argv)
    from framework.run.launch import launch_ranks

    world_sizes = [int(w) for w in a.world_sizes.split(",")]
    if a.runs:
        rows = _read_runs(a.runs)
    else:
        rows = []
        for ws in world_sizes:
            rows += launch_ranks(_rank_measure, ParallelSpec(world_size=ws), STRATEGIES)
    decode = launch_ranks(_rank_decode, ParallelSpec(world_size=2), DECODE_STRATEGIES)
    copy = _memcpy_gbps()
    topo = add_insitu(fit_host(rows, copy_gbps=copy), decode["inloop"])
    held = fit_host(rows, {min(world_sizes), max(world_sizes)}, copy_gbps=copy)
    err_all = allreduce_errors(topo, rows)
    err_held = [
        e
        for e in allreduce_errors(held, rows)
        if e["world_size"] not in (min(world_sizes), max(world_sizes))
    ]
    # the decode check's constants come from its own interleaved rounds (see measure_decode)
    dec_topo = add_insitu(fit_host(decode["allreduce"], copy_gbps=copy), decode["inloop"])
    err_dec = decode_errors(dec_topo, decode["decode"])
    Path(a.topology).write_text(
        "# Fitted on this host by `python -m experiments.calibrate`; regenerate to refit.\n"
        + to_yaml(topo)
    )
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "allreduce": err_all,
        "held_out": err_held,
        "decode": err_dec,
        "decode_fits": dec_topo.fits,
        "inloop": decode["inloop"],
        "median_rel_error": {
            "allreduce": median_error(err_all),
            "held_out_world_size": median_error(err_held),
            "decode_step": median_error(err_dec),
        },
        "fits": topo.fits,
        "copy_gbps": copy,
    }
    (out / "validation.json").write_text(json.dumps(data, indent=2) + "\n")
    _plot(err_all, out / "validation.png")
    md = to_markdown(data)
    (out / "validation.md").write_text(md)
    print(md)


def _rank_measure(fabric: Any, strategies: list[str]) -> list[dict[str, Any]]:
    return measure_allreduce(strategies)


def _rank_decode(fabric: Any, strategies: list[str]) -> list[dict[str, Any]]:
    return measure_decode(strategies)


def _memcpy_gbps(nbytes: int = 16 << 20) -> float:
    return nbytes / statistics.median(memcpy_times(nbytes, 10, CPU)) / 1e9


def to_markdown(data: dict[str, Any]) -> str:
    m = data["median_rel_error"]
    lines = [
        "# Cost model against measurement on this host",
        "",
        f"Median relative error: all-reduce {m['allreduce']:.1%} (fit on every world "
        f"size), {m['held_out_world_size']:.1%} (fit on the smallest and largest world "
        f"size, predicting the others); decode step {m['decode_step']:.1%}.",
        "",
        "| algorithm | alpha (us) | alpha_over (us) | beta (ns/B) | overhead (us) |",
        "|---|---|---|---|---|",
    ]
    for algo, f in data["fits"].items():
        lines.append(
            f"| {algo} | {f['alpha_s'] * 1e6:.2f} | {f['alpha_over_s'] * 1e6:.2f} | "
            f"{f['beta_s_per_byte'] * 1e9:.3f} | {f['overhead_s'] * 1e6:.1f} |"
        )
    lines += [
        "",
        "| strategy | p | size (B) | measured (us) | predicted (us) | error |",
        "|---|---|---|---|---|---|",
    ]
    for e in data["allreduce"]:
        lines.append(
            f"| {e['strategy']} | {e['world_size']} | {e['size']} | "
            f"{e['measured_us']:.1f} | {e['predicted_us']:.1f} | {e['rel_error']:.0%} |"
        )
    lines += [
        "",
        "In-situ extra per all-reduce (`insitu_s`: in-loop cost minus back-to-back "
        "time, all-reduces after compute segments as long as the decode's):",
        "",
        "| algorithm | written to this_host (us) | in the decode check (us) |",
        "|---|---|---|",
    ]
    for algo, f in data["fits"].items():
        if "insitu_s" in f:
            dec = data["decode_fits"].get(algo, {}).get("insitu_s", float("nan"))
            lines.append(f"| {algo} | {f['insitu_s'] * 1e6:.0f} | {dec * 1e6:.0f} |")
    lines += [
        "",
        "Each is relative to the back-to-back time of its own fit: this_host's fit on "
        "every world size, the decode check's on the world-size-2 all-reduces measured "
        "in its rounds.",
    ]
    lines += [
        "",
        "Decode step, tiny model, TP 2, batch 4. Predicted = compute (a decode run with "
        "no communication) + all-reduces x (back-to-back model time + in-situ extra), "
        "with constants fitted on all-reduces measured in the same interleaved rounds:",
        "",
        "| strategy | measured (ms) | compute (ms) | predicted comm (ms) | "
        "predicted (ms) | error |",
        "|---|---|---|---|---|---|",
    ]
    for e in data["decode"]:
        lines.append(
            f"| {e['strategy']} | {e['measured_s'] * 1e3:.2f} | "
            f"{e['compute_s'] * 1e3:.2f} | {e['predicted_comm_s'] * 1e3:.2f} | "
            f"{e['predicted_s'] * 1e3:.2f} | {e['rel_error']:.0%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
