"""adaptive_threshold: bucketed, with the flush threshold fitted from measured collectives.

A collective of n bytes costs about alpha + beta * n. Fusion saves one alpha per message but a
bigger bucket waits longer to start, so the useful bucket size is where the bandwidth term has
grown to ``amortize`` times the latency term: threshold = amortize * alpha / beta, clamped to
[min_bytes, max_bytes]. (With amortize = 4 the fixed cost is at most 20% of a full bucket's
time.) alpha and beta come from a least-squares fit of the collectives this communicator has
timed (on its progress thread, or with CUDA events on NCCL), refitted every ``refit_every``
collectives, or from ``table``: a CSV written by ``experiments.bench`` (columns ``size`` and
``time_us``). The threshold is only changed when nothing is held or in flight, so ranks
(which see the same sequence of calls but time them differently) could otherwise disagree on
bucket boundaries; to keep every rank's buckets identical, the fit is averaged over the group
with a tiny all-reduce when it changes. Fitted ``alpha_s``, ``beta_s_per_byte`` and
``threshold_bytes`` are in ``stats.extra``. Summation order is the inner algorithm's.

Devices: those of ``inner``, as ``bucketed``.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import torch
import torch.distributed as dist

from framework import register_strategy
from strategies.bucketed import Bucketed, _Bucket


def fit_alpha_beta(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (alpha, beta) for time = alpha + beta * bytes; None if ill-posed."""
    if len({n for n, _ in samples}) < 2:
        return None
    x = torch.tensor([[1.0, float(n)] for n, _ in samples], dtype=torch.float64)
    y = torch.tensor([t for _, t in samples], dtype=torch.float64)
    alpha, beta = torch.linalg.lstsq(x, y).solution.tolist()
    return (alpha, beta) if alpha > 0 and beta > 0 else None


@register_strategy("adaptive_threshold")
class AdaptiveThreshold(Bucketed):
    fixed_options = ("bucket_bytes",)  # the fit decides it; initial_bytes is the start value

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        lo, start, hi = options["min_bytes"], options["initial_bytes"], options["max_bytes"]
        if not 0 < lo <= start <= hi:
            raise ValueError(
                f"strategy {cls.name!r}: need 0 < min_bytes <= initial_bytes <= max_bytes, "
                f"got {lo}, {start}, {hi}"
            )
        cls.require_positive(amortize=options["amortize"])
        cls.require_at_least(1, refit_every=options["refit_every"])
        table = options["table"]
        if table is not None and not os.path.isfile(table):
            raise ValueError(
                f"strategy {cls.name!r}: table {table!r} is not a file (a CSV of size, "
                f"time_us rows, as experiments.calibrate writes)"
            )

    def __init__(
        self,
        group=None,
        *,
        min_bytes: int = 4 << 10,
        max_bytes: int = 64 << 20,
        initial_bytes: int = 256 << 10,
        amortize: float = 4.0,
        refit_every: int = 64,
        table: str | None = None,
        **rest: Any,
    ) -> None:
        super().__init__(group, bucket_bytes=initial_bytes, **rest)
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self.amortize, self.refit_every = amortize, refit_every
        self.alpha_s = self.beta_s_per_byte = float("nan")
        self._since_fit = 0
        if table is not None:
            self._apply(fit_alpha_beta(_read_table(table)), sync=False)
            self.refit_every = 0  # a table fixes the fit
        self._publish()

    def threshold(self) -> int:
        return self.bucket_bytes

    def _on_bucket_done(self, b: _Bucket) -> None:
        self._since_fit += 1
        idle = not self._order and self.in_flight == 0
        if self.refit_every and self._since_fit >= self.refit_every and idle:
            self._since_fit = 0
            self._apply(fit_alpha_beta(list(self.timings)), sync=True)

    def _apply(self, fit: tuple[float, float] | None, sync: bool) -> None:
        vals = torch.tensor(fit if fit else (0.0, 0.0), dtype=torch.float64)
        if sync:  # every rank must cut buckets at the same place: use the group's mean fit
            ok = torch.tensor([float(fit is not None)], dtype=torch.float64)
            both = torch.cat([vals, ok]).to(self.device)
            dist.all_reduce(both, group=self.group)
            if both[2].item() < self.world_size:  # some rank has no usable fit yet
                return
            vals = both[:2].cpu() / self.world_size
        elif fit is None:
            return
        self.alpha_s, self.beta_s_per_byte = vals.tolist()
        want = int(self.amortize * self.alpha_s / self.beta_s_per_byte)
        self.bucket_bytes = max(self.min_bytes, min(self.max_bytes, want))
        self._publish()

    def _publish(self) -> None:
        self.stats.extra.update(
            alpha_s=self.alpha_s,
            beta_s_per_byte=self.beta_s_per_byte,
            threshold_bytes=float(self.bucket_bytes),
        )

    def reset_stats(self) -> None:
        super().reset_stats()
        self._publish()


def _read_table(path: str) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["size"]), float(r["time_us"]) * 1e-6) for r in csv.DictReader(f)]
