"""Exact integer inputs for checking an all-reduce: each rank rebuilds every rank's input.

A rank's input is a function of (seed, rank, numel) alone, so any rank can compute the exact
sum itself and correctness never depends on the strategy under test. Values are integers in
[-8, 8]: every partial sum over up to 32 ranks is an integer of magnitude <= 256, exact in
bfloat16 (8 significant bits), float16 and every wider dtype, whatever the summation order.
The conformance kit and the benchmark's ``#wrong`` column both use these.
"""

from __future__ import annotations

import torch


def rank_input(seed: int, rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The input of ``rank``: ``numel`` small integers drawn from a generator seeded per rank."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def expected_sum(seed: int, world: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact sum of every rank's :func:`rank_input`, summed in float64 and cast once."""
    total = sum(rank_input(seed, r, numel, torch.float64) for r in range(world))
    return total.to(dtype)
