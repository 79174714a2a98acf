"""A composite strategy written from the public plugin surface alone (``framework.__all__``):
a size-switching dispatcher, like ``auto`` without the tuning. It builds its parts with
``build_inner``, checks its options in ``option_rules`` with ``check_algorithm``, and runs each
call as a ``step`` of its own operation, on its ``deadline``. The conformance kit holds it to
the exact results, and no private name is touched (read from its source)."""

from __future__ import annotations

import inspect
import re
from typing import Any

from torch import Tensor

import framework
from framework import Algorithm, build_inner, check_algorithm, register_strategy


class SizeSwitch(Algorithm):
    """``small`` for messages up to ``threshold`` bytes, ``large`` above."""

    def __init__(
        self,
        group=None,
        *,
        small: str = "shm",
        large: str = "naive",
        threshold: int = 4096,
        **common: Any,
    ) -> None:
        super().__init__(group, **common)
        self.threshold = threshold
        self.small, self.large = build_inner(self, small), build_inner(self, large)
        self.supports = {
            b: self.small.supports[b] & self.large.supports[b]
            for b in self.supports
            if b in self.small.supports and b in self.large.supports
        }
        self.stats.extra.update(small_calls=0, large_calls=0)

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        check_algorithm(cls.name, "small", options["small"], {})
        check_algorithm(cls.name, "large", options["large"], {})
        cls.require_at_least(0, threshold=options["threshold"])

    def _part(self, x: Tensor) -> Algorithm:
        part = self.small if x.nbytes <= self.threshold else self.large
        self.stats.extra["small_calls" if part is self.small else "large_calls"] += 1
        return part

    # one hook per op; step() has set self.deadline, the clock every part's step shares
    def reduce_(self, x: Tensor) -> None:
        self._part(x).step("all_reduce", x, x, self.deadline)

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        self._part(x).step("reduce_scatter", x, out, self.deadline)

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        self._part(x).step("all_gather", x, out, self.deadline)


def test_it_uses_only_the_public_surface() -> None:
    source = inspect.getsource(SizeSwitch)
    # self._part is the class's own helper; nothing of commlab's is private
    used = set(re.findall(r"\.\s*(_(?!_)\w+)", source)) - {"_part"}
    assert not used, f"private attributes used: {used}"
    imported = {"Algorithm", "build_inner", "check_algorithm", "register_strategy"}
    assert imported <= set(framework.__all__)


def _conformance() -> dict:
    import torch

    from framework import build_communicator
    from framework.comm import registry
    from framework.testing import run_checks

    register_strategy("test_size_switch")(SizeSwitch)
    try:
        passed = run_checks("test_size_switch", {"threshold": 256})
        comm = build_communicator("test_size_switch", threshold=256)
        comm.all_reduce(torch.ones(8)).wait()  # 32 B: small
        comm.all_reduce(torch.ones(1024)).wait()  # 4 KiB: large
        extra, collectives = dict(comm.stats.extra), comm.stats.collectives
        comm.close()
    finally:  # a pool rank's registry must not offer it to auto in later tests
        registry._REGISTRY.pop("test_size_switch", None)
    return {"passed": passed, "extra": extra, "collectives": collectives}


def test_a_dispatcher_from_the_public_surface_passes_the_kit(pools) -> None:
    for r in pools(2).run(_conformance):
        assert len(r["passed"]) >= 8, r["passed"]
        assert r["extra"]["small_calls"] == r["extra"]["large_calls"] == 1, r["extra"]
        assert r["collectives"] == 2  # one per call: the parts' steps are not counted again
