"""Timing a fused op against its composition, compute included: what ``bench.op=<fused op>`` runs.

A fused op is worth having only if it beats doing the same work in pieces, so each size is
timed four ways on the same inputs, interleaved round by round so drift hits each alike:

* ``fused``: the strategy's fused op (``comm.all_reduce_add_rmsnorm(...).wait()``, ...);
* ``composed``: the strategy's plain collective, then the compute by the caller (the model's
  code before fusion);
* ``comm``: the plain collective alone; ``compute``: the compute alone (no communication).

Each iteration's time is the slowest rank's; medians over iterations. ``speedup`` = composed /
fused; ``hidden`` = (composed - fused) / min(comm, compute): the share of the shorter of the
two that the fused op took off the critical path (1: perfectly overlapped or fused away; 0:
nothing gained; negative: the fusion costs). ``max_diff`` is the largest difference between
the fused and the composed results (0 where the strategy keeps the summation order).

Sizes follow nccl-tests: the all-reduce's message (``all_reduce_add_rmsnorm``), the gathered
buffer (``all_gather_matmul``), the reduce-scatter's input, i.e. the matmul's output
(``matmul_reduce_scatter``); tensors are (rows, ``hidden``) and weights (hidden, hidden).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from framework.comm.fused import add_rmsnorm, gather_matmul
from framework.run.measure import SweepSpec, max_over_ranks
from framework.run.spread import median_interval

WAYS = ("fused", "composed", "comm", "compute")


def _case(op: str, nbytes: int, hidden: int, dtype: torch.dtype, rank: int, world: int):
    """(size in bytes, rows per rank, the inputs, the four ways as callables, refill)."""
    elem = torch.empty((), dtype=dtype).element_size()
    count = max(nbytes // elem, 1)
    cols = min(hidden, count)
    mine, shared = (torch.Generator().manual_seed(s) for s in (1000 * rank + count, count))

    def rand(*shape: int, same: bool = False) -> torch.Tensor:
        """This rank's partial sums; ``same``: what TP replicates (residual, weights)."""
        return torch.randn(*shape, generator=shared if same else mine).to(dtype)

    if op == "all_reduce_add_rmsnorm":
        rows = max(count // cols, 1)
        saved = rand(rows, cols)
        residual, weight = rand(rows, cols, same=True), rand(cols, same=True)
        x = saved.clone()

        def refill() -> None:
            x.copy_(saved)

        return (
            rows * cols * elem,
            rows,
            {
                "fused": lambda c: c.all_reduce_add_rmsnorm(x, residual, weight, 1e-5).wait(),
                "composed": lambda c: add_rmsnorm(c.all_reduce(x).wait(), residual, weight, 1e-5),
                "comm": lambda c: c.all_reduce(x).wait(),
                "compute": lambda c: add_rmsnorm(x, residual, weight, 1e-5),
            },
            refill,
        )
    w = rand(cols, cols, same=True)
    if op == "all_gather_matmul":
        rows = max(count // (cols * world), 1)
        shard = rand(rows, cols)
        gathered = torch.cat([shard] * world)  # the compute-only way's input: same shape
        return (
            rows * world * cols * elem,
            rows,
            {
                "fused": lambda c: c.all_gather_matmul(shard, [w]).wait(),
                "composed": lambda c: gather_matmul(c.all_gather(shard).wait(), [w]),
                "comm": lambda c: c.all_gather(shard).wait(),
                "compute": lambda c: gather_matmul(gathered, [w]),
            },
            lambda: None,
        )
    rows = max(count // cols // world, 1)
    x = rand(rows * world, cols)
    product = torch.matmul(x, w)  # the comm-only way's input: the same message
    saved = product.clone()

    def refill_product() -> None:
        product.copy_(saved)

    return (
        rows * world * cols * elem,
        rows,
        {
            "fused": lambda c: c.matmul_reduce_scatter(x, w).wait(),
            "composed": lambda c: c.reduce_scatter(torch.matmul(x, w)).wait(),
            "comm": lambda c: c.reduce_scatter(product).wait(),
            "compute": lambda c: torch.matmul(x, w),
        },
        refill_product,
    )


def _first(result: Any) -> torch.Tensor:
    """The tensor to compare: the normed output, the first product, the scattered rows."""
    if isinstance(result, tuple):
        second = result[1]
        return second[0] if isinstance(second, list) else result[0]
    return result


def _timed(
    fn: Callable[[Any], Any], comm: Any, refill: Callable[[], None], iters: int
) -> list[float]:
    dist.barrier()
    times = []
    for _ in range(iters):
        refill()
        t0 = time.perf_counter()
        fn(comm)
        times.append(time.perf_counter() - t0)
    return times


def fused_sweep(
    comms: list[Any], labels: list[str], spec: SweepSpec, hidden: int, rank: int, world: int
) -> dict[str, Any]:
    """One row per (size, strategy): the four ways' medians (us) and intervals, speedup,
    hidden share and max_diff. Every strategy and way is interleaved in each round."""
    rows: list[dict[str, Any]] = []
    for size in spec.sizes:
        nbytes, per_rank, ways, refill = _case(spec.op, size, hidden, spec.dtype, rank, world)
        for c in comms:
            for way in WAYS:
                for _ in range(spec.warmup):
                    refill()
                    ways[way](c)
        times = {(i, way): [] for i in range(len(comms)) for way in WAYS}  # labels may repeat
        for _ in range(spec.rounds):
            for i, c in enumerate(comms):
                for way in WAYS:
                    times[i, way] += _timed(ways[way], c, refill, spec.iters)
        for i, (lb, c) in enumerate(zip(labels, comms, strict=True)):
            med = {}
            row: dict[str, Any] = {"size": nbytes, "rows_per_rank": per_rank, "strategy": lb}
            for way in WAYS:
                slowest = max_over_ranks(times[i, way]).tolist()
                span = median_interval([t * 1e6 for t in slowest])
                med[way] = span["median"]
                row[f"{way}_us"] = round(span["median"], 3)
                row[f"{way}_spread_us"] = [round(span["lo"], 3), round(span["hi"], 3)]
            shorter = min(med["comm"], med["compute"])
            row["speedup"] = round(med["composed"] / med["fused"], 4)
            row["hidden"] = round((med["composed"] - med["fused"]) / shorter, 4)
            refill()
            got = _first(ways["fused"](c)).double()
            refill()
            want = _first(ways["composed"](c)).double()
            row["max_diff"] = float(max_over_ranks(float((got - want).abs().max())))
            rows.append(row)
    return {"rows": rows}
