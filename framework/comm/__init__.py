"""The communication core: everything a strategy may import, and nothing else of commlab.

It imports no other part of ``framework`` (checked by ``tests/unit/test_architecture.py``), so a
strategy author's world is this folder: the interface, the two base classes, the registry,
buffers, private groups, the shared-memory transport, profiling spans and launcher facts.
"""

from framework.comm.algorithm import Algorithm, Composed, Schedule, check_algorithm
from framework.comm.communicator import CommError, Communicator
from framework.comm.handle import Handle
from framework.comm.library import HOST_ONLY, HOST_OR_NCCL, LIBRARY_SUPPORT
from framework.comm.reduction import sum_rank_order
from framework.comm.registry import (
    available_strategies,
    build_communicator,
    build_inner,
    get_strategy,
    register_strategy,
    strategy_options,
)
from framework.comm.stats import CommStats

__all__ = [
    "HOST_ONLY",
    "HOST_OR_NCCL",
    "LIBRARY_SUPPORT",
    "Algorithm",
    "CommError",
    "CommStats",
    "Communicator",
    "Composed",
    "Handle",
    "Schedule",
    "available_strategies",
    "build_communicator",
    "build_inner",
    "check_algorithm",
    "get_strategy",
    "register_strategy",
    "strategy_options",
    "sum_rank_order",
]
