"""Shared fixtures: one long-lived pool of ranks per world size for the whole session."""

from __future__ import annotations

import os

import pytest

from framework.testing.rankpool import RankPool

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


class Pools:
    """Spawns ranks once per world size and reuses them; replaces a pool a failure broke."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.healthy:
            pool = self._pools[world_size] = RankPool(world_size)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()
