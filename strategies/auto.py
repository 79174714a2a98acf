"""auto: choose the algorithm per message, from a measured table or by timing them in warm-up.

Every production stack does this (SGLang's tuning tables, vLLM's per-world-size thresholds,
TensorRT-LLM's AUTO). Each call is dispatched by (op, dtype, size bucket: the next power of
two) to one of ``candidates`` (default: every registered exact algorithm this backend runs,
``candidate_options`` per candidate), chosen:

* from ``table`` (a name: the user's table, else one shipped with commlab; or a ``.json``
  path; :mod:`framework.comm.tuning`) written by
  ``python -m experiments.bench bench.tune=<name>``: the rows of this world size; a size
  outside the table takes its nearest bucket, a dtype missing from it the float32 rows;
* or, without a table, online: the first call of each (op, dtype, bucket) times every
  candidate ``tune_iters`` times on a copy of its input, in the candidates' order (the same
  on every rank), takes the MAX over ranks of each median (the slowest rank sets the pace)
  and keeps the fastest, identical on every rank. The runner's warm-up sends every message
  shape of the run, and :meth:`Auto.end_warmup` freezes the choices before the measured
  part: a bucket first seen after it takes its nearest tuned neighbour, untimed.

It logs the table it uses (one line per size range: the choice and its measured time) at
start (table) or at the end of warm-up (online), and counts the calls each candidate served
in ``stats.extra`` (``auto_<name>_calls``). Candidates that are not exact (``quantized``) are
refused unless ``allow_inexact=true``: a run must not silently mix numerically different
arithmetic (TensorRT-LLM's autotuner did, and GSM8K scores went bimodal).

Devices: those every candidate supports.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from framework import Algorithm, check_algorithm, register_strategy
from framework.comm.registry import build_inner, exact_algorithms, get_strategy
from framework.comm.tuning import bucket_of, describe, load_table

log = logging.getLogger("commlab.auto")


@register_strategy("auto")
class Auto(Algorithm):
    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_at_least(1, tune_iters=options["tune_iters"])
        per = options["candidate_options"] or {}
        for n in list(options["candidates"] or ()) + sorted(per):
            check_algorithm(cls.name, "candidate", n, per.get(n, {}))
            if not get_strategy(n).exact and not options["allow_inexact"]:
                raise ValueError(
                    f"strategy {cls.name!r}: candidate {n!r} is not exact; set "
                    f"allow_inexact=true to let auto mix numerically different arithmetic"
                )
        extra = sorted(set(per) - set(options["candidates"] or per))
        if extra:
            raise ValueError(
                f"strategy {cls.name!r}: candidate_options names {extra}, which are not "
                f"among the candidates {options['candidates']}"
            )
        if options["table"] is not None:
            try:
                load_table(options["table"])  # missing or malformed: refused before any rank
            except (OSError, ValueError) as e:
                raise ValueError(f"strategy {cls.name!r}: table: {e}") from None

    def __init__(
        self,
        group=None,
        *,
        candidates: list[str] | None = None,
        candidate_options: dict[str, dict[str, Any]] | None = None,
        table: str | None = None,
        allow_inexact: bool = False,
        tune_iters: int = 3,
        **common: Any,
    ) -> None:
        names = list(candidates) if candidates else None
        rows = load_table(table)["rows"] if table is not None else None
        super().__init__(group, **common)
        if names is None:
            names = exact_algorithms(self.backend)
        options = dict(candidate_options or {})
        self.algos = {n: build_inner(self, n, **options.get(n, {})) for n in names}
        self.supports = {
            b: frozenset.intersection(
                *(a.supports.get(b, frozenset()) for a in self.algos.values())
            )
            for b in type(self).supports
        }
        self.exact = all(a.exact for a in self.algos.values())
        self.tune_iters = tune_iters
        self.frozen = False
        # (op, dtype name, bucket) -> [algorithm, time_us]
        self.choice: dict[tuple[str, str, int], tuple[str, float]] = {}
        # keys first seen after the choices were fixed -> their nearest tuned neighbour's
        self.untuned: dict[tuple[str, str, int], tuple[str, float]] = {}
        self._fast: dict[tuple[str, torch.dtype, int], tuple[Algorithm, bool]] = {}
        self._served = {n: f"auto_{n}_calls" for n in self.algos}  # stats.extra keys
        self.source = "online"
        if rows is not None:
            self._load(table, rows)
            self.frozen = True
            self.log_choices()

    # -- choosing --------------------------------------------------------------------------
    def _load(self, name: str, rows: list[dict[str, Any]]) -> None:
        rows = [r for r in rows if r["world_size"] == self.world_size]
        if not rows:
            raise ValueError(
                f"strategy {self.name!r}: table {name!r} has no rows for world size "
                f"{self.world_size}; tune it with experiments.bench at this world size"
            )
        unknown = sorted({r["algorithm"] for r in rows} - set(self.algos))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r}: table {name!r} chooses {unknown}, which are not "
                f"among the candidates {sorted(self.algos)}"
            )
        for r in rows:
            self.choice[(r["op"], r["dtype"], r["bucket_bytes"])] = (r["algorithm"], r["time_us"])
        self.source = f"table {name}"

    def _key(self, op: str, x: Tensor) -> tuple[str, str, int]:
        return (op, str(x.dtype).removeprefix("torch."), bucket_of(x.nbytes))

    def _choose(self, op: str, x: Tensor) -> tuple[Algorithm, bool]:
        """The candidate for this call, and whether its bucket was never tuned. The hot path
        is one dict lookup by (op, dtype, bytes): a decision, once made, never changes."""
        fast = self._fast.get((op, x.dtype, x.nbytes))
        if fast is not None:
            return fast
        key = self._key(op, x)
        hit = self.choice.get(key) or self.untuned.get(key)
        if hit is None:
            if self.frozen:
                hit = self.untuned[key] = self._nearest(key)
            else:
                hit = self.choice[key] = self._tune(key, op, x)
        out = self._fast[(op, x.dtype, x.nbytes)] = (self.algos[hit[0]], key in self.untuned)
        return out

    def _nearest(self, key: tuple[str, str, int]) -> tuple[str, float]:
        """A bucket the table or the warm-up did not see: the nearest one of the same op
        (same dtype, else float32; nothing at all: the first candidate)."""
        op, dtype, bucket = key
        for dt in (dtype, "float32"):
            near = [
                (abs(b.bit_length() - bucket.bit_length()), b)
                for o, d, b in self.choice
                if (o, d) == (op, dt)
            ]
            if near:
                return self.choice[(op, dt, min(near)[1])]
        return (next(iter(self.algos)), float("nan"))

    def _tune(self, key: tuple[str, str, int], op: str, x: Tensor) -> tuple[str, float]:
        """Time every candidate on copies of ``x``; the fastest by its slowest rank."""
        medians = []
        for algo in self.algos.values():
            times = []
            for _ in range(self.tune_iters):
                y = x.clone()
                out = algo.output(op, y)
                t0 = time.perf_counter()
                algo.step(op, y, out)
                if y.is_cuda:
                    torch.cuda.synchronize(y.device)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
        t = torch.tensor(medians, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        best = int(t.argmin())
        self.deadline = time.monotonic() + self.timeout_s  # the call itself starts now
        return (list(self.algos)[best], float(t[best]) * 1e6)

    def end_warmup(self) -> None:
        """Fix the choices made so far (online tuning) and log them."""
        if not self.frozen:
            self.frozen = True
            self.log_choices()

    def log_choices(self) -> None:
        rows = [
            {
                "op": op,
                "dtype": dt,
                "world_size": self.world_size,
                "bucket_bytes": b,
                "algorithm": a,
                "time_us": t,
            }
            for (op, dt, b), (a, t) in self.choice.items()
        ]
        if self.rank != 0:
            return
        lines = [f"auto ({self.source}, {self.world_size} ranks): {len(rows)} size buckets"]
        lines += [f"auto: {line}" for line in describe(rows)]
        for line in lines:
            if log.isEnabledFor(logging.INFO) and log.hasHandlers():  # a Hydra job's log
                log.info(line)
            else:  # a spawned rank: no logging configured, so its stderr
                print(line, file=sys.stderr, flush=True)

    # -- dispatch --------------------------------------------------------------------------
    def _count(self, x: Tensor, op: str = "all_reduce") -> None:
        algo, untuned = self._choose(op, x)
        extra, served = self.stats.extra, self._served[algo.name]
        extra[served] = extra.get(served, 0) + 1
        if untuned:
            extra["auto_untuned_calls"] = extra.get("auto_untuned_calls", 0) + 1
        self.stats.count_collective(op, algo.op_wire_bytes(op, x.nbytes))

    def _dispatch(self, op: str, x: Tensor, out: Tensor) -> None:
        """The chosen candidate's step, on this operation's clock."""
        self._choose(op, x)[0].step(op, x, out, self.deadline)

    def reduce_(self, x: Tensor) -> None:
        self._dispatch("all_reduce", x, x)

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        self._dispatch("reduce_scatter", x, out)

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        self._dispatch("all_gather", x, out)

    def reset_stats(self) -> None:
        super().reset_stats()
        for k in [k for k in self.stats.extra if k.startswith("auto_")]:
            del self.stats.extra[k]

    def _release(self) -> None:
        super()._release()
        for algo in self.algos.values():
            algo._release()
