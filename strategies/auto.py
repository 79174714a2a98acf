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

A candidate is a name or a label with options (``"quantized:fmt=int8,block=32"``), so one
strategy may be offered in several settings. ``error_budget`` (no anchor has one) bounds what
the chosen arithmetic may cost: ``ppl_change`` (perplexity ratio - 1, the top of its interval)
and ``kl_per_token`` as measured end to end on a trained model and read from the ``accuracy``
table (:mod:`framework.comm.accuracy`; the quantized study writes it), or ``rel_error``, the
element error a candidate states itself (``error_bound``) relative to the inputs' magnitude, per
message size. Each message goes to the fastest candidate within the budget (a budget lets
inexact candidates in, as ``allow_inexact`` does). ``deterministic=true`` keeps only the
candidates that share one summation order independent of message size and batch
(``Communicator.summation_order``), so a token's bits do not depend on what else is in the
message. Both log what they kept and why they dropped the rest.

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
from framework.comm.accuracy import METRICS, admissible, load_accuracy, relative_error
from framework.comm.registry import build_inner, exact_algorithms, get_strategy, parse_strategy
from framework.comm.tuning import bucket_of, describe, load_table

log = logging.getLogger("commlab.auto")


@register_strategy("auto")
class Auto(Algorithm):
    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_at_least(1, tune_iters=options["tune_iters"])
        per = options["candidate_options"] or {}
        budget = options["error_budget"] or {}
        labels = list(options["candidates"] or ())
        for label in labels + sorted(per):
            n, opts = parse_strategy(label)
            check_algorithm(cls.name, "candidate", n, {**per.get(n, {}), **opts})
            if not get_strategy(n).exact and not (options["allow_inexact"] or budget):
                raise ValueError(
                    f"strategy {cls.name!r}: candidate {label!r} is not exact; set "
                    f"allow_inexact=true (or an error_budget) to let auto mix numerically "
                    f"different arithmetic"
                )
        extra = sorted(set(per) - {parse_strategy(n)[0] for n in labels or per})
        if extra:
            raise ValueError(
                f"strategy {cls.name!r}: candidate_options names {extra}, which are not "
                f"among the candidates {options['candidates']}"
            )
        for metric, bound in budget.items():
            if metric not in METRICS or not isinstance(bound, int | float) or bound < 0:
                raise ValueError(
                    f"strategy {cls.name!r}: error_budget bounds {list(METRICS)} with numbers "
                    f">= 0, got {metric}={bound!r}"
                )
        measured = sorted(set(budget) - {"rel_error"})
        if measured and options["accuracy"] is None:
            raise ValueError(
                f"strategy {cls.name!r}: error_budget on {measured} reads them from an "
                f"accuracy table: set accuracy=<name or path>"
            )
        for key, load in (("table", load_table), ("accuracy", load_accuracy)):
            if options[key] is not None:
                try:
                    load(options[key])  # missing or malformed: refused before any rank
                except (OSError, ValueError) as e:
                    raise ValueError(f"strategy {cls.name!r}: {key}: {e}") from None

    def __init__(
        self,
        group=None,
        *,
        candidates: list[str] | None = None,
        candidate_options: dict[str, dict[str, Any]] | None = None,
        table: str | None = None,
        allow_inexact: bool = False,
        tune_iters: int = 3,
        error_budget: dict[str, float] | None = None,
        accuracy: str | None = None,
        deterministic: bool = False,
        **common: Any,
    ) -> None:
        labels = list(candidates) if candidates else None
        rows = load_table(table)["rows"] if table is not None else None
        super().__init__(group, **common)
        if labels is None:
            labels = exact_algorithms(self.backend)
        per = dict(candidate_options or {})
        self.algos = {}
        for label in labels:  # a name, or "name:key=value,...": one candidate each
            name, opts = parse_strategy(label)
            self.algos[label] = build_inner(self, name, **{**per.get(name, {}), **opts})
        self.budget = dict(error_budget or {})
        kept, self.dropped, order = admissible(
            self.algos, self.world_size, self.budget, accuracy, deterministic
        )
        if not kept:
            raise ValueError(
                f"strategy {self.name!r}: no candidate is left: {self.dropped} (add an exact "
                f"candidate, or loosen error_budget / deterministic)"
            )
        for label in self.dropped:
            self.algos.pop(label)._release()
        self.supports = {
            b: frozenset.intersection(
                *(a.supports.get(b, frozenset()) for a in self.algos.values())
            )
            for b in type(self).supports
        }
        self.exact = all(a.exact for a in self.algos.values())
        orders = {a.summation_order for a in self.algos.values()}
        self.summation_order = orders.pop() if len(orders) == 1 else None
        self.tune_iters = tune_iters
        self.frozen = False
        # (op, dtype name, bucket) -> [algorithm, time_us]
        self.choice: dict[tuple[str, str, int], tuple[str, float]] = {}
        # keys first seen after the choices were fixed -> their nearest tuned neighbour's
        self.untuned: dict[tuple[str, str, int], tuple[str, float]] = {}
        self._fast: dict[tuple[str, torch.dtype, int], tuple[str, bool]] = {}
        self._served = {n: f"auto_{n}_calls" for n in self.algos}  # stats.extra keys
        self.source = "online"
        self.log_kept(deterministic, order)
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
        unknown = sorted({r["algorithm"] for r in rows} - set(self.algos) - set(self.dropped))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r}: table {name!r} chooses {unknown}, which are not "
                f"among the candidates {sorted(self.algos)}"
            )
        for r in rows:
            key = (r["op"], r["dtype"], r["bucket_bytes"])
            times = {a: t for a, t in (r.get("times_us") or {}).items() if a in self.algos}
            times.setdefault(r["algorithm"], r["time_us"])
            allowed = self._allowed(key, list(times))
            if allowed:  # the fastest this run may use (the table's own choice, unless not)
                best = min(allowed, key=times.__getitem__)
                self.choice[key] = (best, times[best])
        self.source = f"table {name}"

    def _allowed(self, key: tuple[str, str, int], labels: list[str]) -> list[str]:
        """Those of ``labels`` this message may go to: all kept candidates, less those
        whose stated element error breaks ``error_budget``'s ``rel_error`` at its size."""
        bound = self.budget.get("rel_error")
        labels = [n for n in labels if n in self.algos]
        if bound is None:
            return labels
        op, dtype, bucket = key
        dt = getattr(torch, dtype)
        numel = max(1, bucket // dt.itemsize)
        return [
            n
            for n in labels
            if relative_error(self.algos[n], op, numel, dt, self.world_size) <= bound
        ]

    def _key(self, op: str, x: Tensor) -> tuple[str, str, int]:
        return (op, str(x.dtype).removeprefix("torch."), bucket_of(x.nbytes))

    def _choose(self, op: str, x: Tensor) -> tuple[str, bool]:
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
        out = self._fast[(op, x.dtype, x.nbytes)] = (hit[0], key in self.untuned)
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
        """Time every candidate this message may use on copies of ``x``; the fastest by its
        slowest rank."""
        labels = self._allowed(key, list(self.algos)) or [self._exact_fallback()]
        medians = []
        for algo in (self.algos[n] for n in labels):
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
        return (labels[best], float(t[best]) * 1e6)

    def _exact_fallback(self) -> str:
        """A message no inexact candidate may take and no exact one was offered for."""
        exact = [n for n, a in self.algos.items() if a.exact]
        if not exact:
            raise self._error(
                f"error_budget {self.budget}: no candidate is within it for this message; "
                f"add an exact candidate"
            )
        return exact[0]

    def end_warmup(self) -> None:
        """Fix the choices made so far (online tuning) and log them."""
        if not self.frozen:
            self.frozen = True
            self.log_choices()

    def log_kept(self, deterministic: bool, order: str | None) -> None:
        """Say which candidates ``deterministic`` and ``error_budget`` left, and why not
        the others."""
        if not (deterministic or self.budget):
            return
        why = [f"deterministic (one {order} summation order)"] if deterministic else []
        why += [f"error_budget {self.budget}"] if self.budget else []
        lines = [f"auto: {' and '.join(why)}: kept {list(self.algos)}"]
        lines += [f"auto: dropped {n}: {reason}" for n, reason in self.dropped.items()]
        self._say(lines)

    def _say(self, lines: list[str]) -> None:
        if self.rank != 0:
            return
        for line in lines:
            if log.isEnabledFor(logging.INFO) and log.hasHandlers():  # a Hydra job's log
                log.info(line)
            else:  # a spawned rank: no logging configured, so its stderr
                print(line, file=sys.stderr, flush=True)

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
        lines = [f"auto ({self.source}, {self.world_size} ranks): {len(rows)} size buckets"]
        self._say(lines + [f"auto: {line}" for line in describe(rows)])

    # -- dispatch --------------------------------------------------------------------------
    def _count(self, x: Tensor, op: str = "all_reduce") -> None:
        label, untuned = self._choose(op, x)
        algo = self.algos[label]
        extra, served = self.stats.extra, self._served[label]
        extra[served] = extra.get(served, 0) + 1
        if untuned:
            extra["auto_untuned_calls"] = extra.get("auto_untuned_calls", 0) + 1
        self.stats.count_collective(op, algo.op_wire_bytes(op, x.nbytes))

    def _dispatch(self, op: str, x: Tensor, out: Tensor) -> None:
        """The chosen candidate's step, on this operation's clock."""
        self.algos[self._choose(op, x)[0]].step(op, x, out, self.deadline)

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
