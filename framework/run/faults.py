"""Rank failures: the one error a failed rank turns into, and fault injection to cause one.

:class:`RankFailure` is raised by the launcher (a Fabric rank died or raised) and by the test
rank pool (a rank raised, died or hung); its message names each rank and why.

``kill`` SIGKILLs the rank (as the OOM killer would), ``raise`` raises a Python exception,
``extra_allreduce`` issues one all-reduce the other ranks never match (a desynchronised
program). The tests check that each ends in a fast, named failure and never a hang.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("none", "kill", "raise", "extra_allreduce")


@dataclass
class FaultSpec:
    kind: str = "none"
    rank: int = 1
    step: int = 2  # decode step after which the fault fires


class RankFailure(RuntimeError):
    """One or more ranks raised, died or hung; the message names each rank and says why."""


class InjectedFault(RuntimeError):
    """The exception ``kind=raise`` raises."""


class FaultInjector:
    """Runner callback (see framework.run.runner.Callback) that fires the configured fault."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec

    def on_decode_step_end(self, runner: Any, step: int) -> None:
        if runner.rank != self.spec.rank or step != self.spec.step:
            return
        if self.spec.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.spec.kind == "raise":
            raise InjectedFault(f"injected failure on rank {runner.rank} at decode step {step}")
        elif self.spec.kind == "extra_allreduce":
            runner.comm.all_reduce(torch.ones(3, device=runner.device)).wait()
