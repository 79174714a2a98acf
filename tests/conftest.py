"""Shared fixtures: one long-lived pool of ranks per world size for the whole session, the
Hydra configs composed in-process, and the runner driven on pool ranks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from framework.testing.rankpool import RankPool

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The second tier: the rest of a matrix whose representative slice the README command runs
FULL = pytest.mark.full


def one_each(names: list[str], sizes: tuple[int, ...], tier: int | None = None) -> list[Any]:
    """Every (name, size) pair for ``parametrize("name, size", ...)``. The README command
    (first tier) runs each name once, at ``sizes[i % tier]`` for the i-th name (``tier``:
    how many of the first sizes it rotates through, default all, so that the slice covers
    every size); the other pairs are marked ``full``."""
    tier = tier or len(sizes)
    pairs = []
    for i, name in enumerate(names):
        for size in sizes:
            marks = () if size == sizes[i % tier] else (FULL,)
            pairs.append(pytest.param(name, size, marks=marks))
    return pairs


def first_only(values: list[Any], n: int = 1) -> list[Any]:
    """``values`` for ``parametrize`` (a tuple: one value per argument): the first ``n`` in
    the README tier, the rest ``full``."""
    return [
        pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=() if i < n else (FULL,))
        for i, v in enumerate(values)
    ]


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


def compose_config(*overrides: str, name: str = "infer", hydra_dir: Path | None = None):
    """The config a command line would get, composed in-process (no subprocess per check).

    With ``hydra_dir`` the Hydra section is kept and installed as the running job's, with
    that output directory, so an entry point's ``main(cfg)`` runs in-process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import experiments.configs  # noqa: F401  (registers the schemas the configs extend)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name=name, overrides=list(overrides), return_hydra_config=hydra_dir is not None
        )
    if hydra_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(hydra_dir)
        HydraConfig.instance().set_config(cfg)
    return cfg


@contextmanager
def as_torchrun_rank() -> Iterator[None]:
    """On a pool rank: the environment torchrun gives its processes, so that Fabric joins the
    pool's process group (the launcher's external path) instead of spawning new ranks."""
    import torch.distributed as dist

    r, w = dist.get_rank(), dist.get_world_size()
    env = {
        "TORCHELASTIC_RUN_ID": "commlab-pool",
        "RANK": str(r),
        "WORLD_SIZE": str(w),
        "LOCAL_RANK": str(r),
        "LOCAL_WORLD_SIZE": str(w),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_on_rank(spec: Any) -> dict[str, Any]:
    """On a pool rank: ``framework.run.runner.launch(spec)`` as under torchrun; an error is
    returned as its text (every rank's), so the pool stays usable."""
    from framework.run.runner import launch

    with as_torchrun_rank():
        try:
            return launch(spec, progress=False)
        except Exception as e:
            return {"status": "raised", "error": f"{type(e).__name__}: {e}"}


def write_table(path: Path, world_size: int = 2) -> str:
    """A small tuning table at ``path``: tree up to 1 KiB, shm above (auto's tests)."""
    rows = [
        {
            "op": "all_reduce",
            "world_size": world_size,
            "dtype": "float32",
            "bucket_bytes": b,
            "algorithm": "tree" if b <= 1024 else "shm",
            "time_us": float(b),
        }
        for b in (256, 512, 1024, 2048, 4096)
    ]
    from framework.comm.tuning import merge_rows

    return str(merge_rows(str(path), rows, {"host": "test"}))
