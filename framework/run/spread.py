"""Median and spread of repeated measurements: what every comparison on a noisy host needs.

Runs here vary by about 20% from one to the next, so one run per point cannot carry a claim.
:func:`median_interval` gives the median of N repeats with a distribution-free interval (order
statistics: no normality assumed) and the confidence it actually reaches with N (N = 3 reaches
75%, N = 5 94%); :func:`ratio_interval` bounds the ratio of two such medians, and a difference
whose interval holds 1 is "within noise".
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def median_interval(xs: list[float], confidence: float = 0.9) -> dict[str, Any]:
    """``{"median", "lo", "hi", "confidence", "runs"}``: lo and hi are the k-th smallest and
    largest of the runs, k the largest for which [lo, hi] covers the true median with at least
    ``confidence`` (binomial order statistics); too few runs give k = 1 (min and max) and the
    lower confidence they reach."""
    runs = [float(x) for x in xs if x is not None and not math.isnan(x)]
    if not runs:
        nan = float("nan")
        return {"median": nan, "lo": nan, "hi": nan, "confidence": 0.0, "runs": []}
    s, n = sorted(runs), len(runs)
    k, reached = 1, _coverage(n, 1)
    while k + 1 <= n // 2 and _coverage(n, k + 1) >= confidence:
        k += 1
        reached = _coverage(n, k)
    return {
        "median": statistics.median(s),
        "lo": s[k - 1],
        "hi": s[n - k],
        "confidence": reached if n > 1 else 0.0,
        "runs": runs,
    }


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n-k+1)) for n independent runs: 1 - 2 P(Binom(n, 1/2) < k)."""
    tail = sum(math.comb(n, i) for i in range(k)) / 2**n
    return 1 - 2 * tail


def ratio_interval(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float]:
    """(median ratio, lo, hi) of ``a / b`` for two :func:`median_interval` results: the
    interval takes the extremes of both (conservative: it holds when both intervals do)."""
    if not b["median"] or not b["lo"] or not b["hi"]:
        return float("nan"), float("nan"), float("nan")
    return a["median"] / b["median"], a["lo"] / b["hi"], a["hi"] / b["lo"]


def within_noise(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the ratio interval of ``a / b`` holds 1: no difference the runs can show."""
    _, lo, hi = ratio_interval(a, b)
    return lo <= 1.0 <= hi
