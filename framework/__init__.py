"""commlab: research framework for the communication of tensor-parallel LLM inference."""

from framework.algorithm import Algorithm, Schedule
from framework.communicator import CommError, CommStats, Communicator, Handle
from framework.registry import (
    available_strategies,
    build_communicator,
    get_strategy,
    register_strategy,
    strategy_options,
)

__all__ = [
    "Algorithm",
    "CommError",
    "CommStats",
    "Communicator",
    "Handle",
    "Schedule",
    "available_strategies",
    "build_communicator",
    "get_strategy",
    "register_strategy",
    "strategy_options",
]
