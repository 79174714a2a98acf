"""Medians and distribution-free intervals of repeats."""

from __future__ import annotations

import pytest

from framework.run.spread import median_interval, ratio_interval, within_noise


def test_median_interval_order_statistics() -> None:
    five = median_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (five["median"], five["lo"], five["hi"]) == (3.0, 1.0, 5.0)
    assert five["confidence"] == pytest.approx(1 - 2 / 32)
    three = median_interval([1.0, 2.0, 9.0])
    assert three["confidence"] == pytest.approx(0.75)  # what three runs can reach, stated
    eleven = median_interval(list(range(11)))
    assert (eleven["lo"], eleven["hi"]) == (2, 8) and eleven["confidence"] >= 0.9
    assert median_interval([7.0])["confidence"] == 0.0


def test_ratio_interval_and_noise() -> None:
    a = median_interval([10.0, 11.0, 12.0])
    b = median_interval([10.5, 11.5, 12.5])
    assert within_noise(a, b)
    fast = median_interval([20.0, 21.0, 22.0])
    assert not within_noise(fast, b)
    ratio, lo, hi = ratio_interval(fast, b)
    assert lo == pytest.approx(20 / 12.5) and hi == pytest.approx(22 / 10.5) and lo < ratio < hi
