"""commlab: research framework for the communication of tensor-parallel LLM inference.

The packages draw the architecture:

* :mod:`framework.comm`: the communication core, everything a strategy may import;
* :mod:`framework.model`: the Llama-family TP model (takes a communicator by protocol);
* :mod:`framework.run`: run specs, launching, the runner and the measurement loop;
* :mod:`framework.testing`: the conformance kit and the long-lived test ranks;
* :mod:`framework.costmodel`: the alpha-beta-gamma cost model (pure math and fits).

The plugin API is re-exported here (``from framework import Algorithm, register_strategy``)
and loaded on first use, so ``import framework.model`` does not load the communication core.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("framework.comm"), name)
    raise AttributeError(f"module 'framework' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
