"""Structured configs: the typed schemas Hydra checks overrides against.

The dataclasses are the framework's own run specs, so a config key and the field that reads it
cannot drift apart; a bad override (``workload.batch_size=abc``) is a type error at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from framework.run.faults import FaultSpec
from framework.run.spec import ModelSpec, ParallelSpec, WorkloadSpec


@dataclass
class BenchSpec:
    min_bytes: int = 1024
    max_bytes: int = 1 << 20
    factor: int = 4
    dtype: str = "float32"
    warmup: int = 5
    iters: int = 20
    many_small: int = 0
    # a strategy ("name" or "name:key=value,..."), or "raw": timed in the same run, interleaved
    baseline: str | None = None
    rounds: int = 1  # alternate strategy and baseline this many times per size
    memcpy: bool = False  # also time a single-core copy of each size (the memory limit)
    # CPU: also the cache-line round trip between two ranks and each size's copy time, and
    # every time as a multiple of their sum (the limit)
    limits: bool = True
    background_load: int = 0  # busy processes running on the host during the measurement
    # all_reduce | reduce_scatter | all_gather (nccl-tests' sizes), or a fused op timed
    # against its composition: all_reduce_add_rmsnorm | all_gather_matmul | matmul_reduce_scatter
    op: str = "all_reduce"
    hidden: int = 1024  # fused ops: the tensors' last dim, weights (hidden, hidden)
    # more strategies timed in the same run, interleaved: "name" or "name:key=value,key=value"
    compare: list[str] | None = None
    # write the fastest of the compared algorithms per size into the user's tuning table
    # <tune>.json (framework.comm.tuning.user_tables_dir)
    # (the table the auto strategy loads); without compare: every exact algorithm
    tune: str | None = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="model", name="model_schema", node=ModelSpec)
    cs.store(group="workload", name="workload_schema", node=WorkloadSpec)
    cs.store(group="parallel", name="parallel_schema", node=ParallelSpec)
    cs.store(group="bench", name="bench_schema", node=BenchSpec)
    cs.store(group="fault", name="fault_schema", node=FaultSpec)


register_configs()
