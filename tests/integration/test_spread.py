"""Medians and intervals of repeated runs, and the runner's repeats."""

from __future__ import annotations

from pathlib import Path

from conftest import compose_config, run_on_rank

import experiments.configs  # noqa: F401
from experiments.common import run_spec
from experiments.report import markdown


def test_repeats_give_medians_and_intervals(pools, tmp_path: Path) -> None:
    cfg = compose_config("workload.repeats=3", "workload.new_tokens=4")
    res = pools(2).run(run_on_rank, run_spec(cfg, str(tmp_path)))[0]
    assert res["status"] == "ok" and res["repeats"] == 3 and res["tokens_agree_across_repeats"]
    spread = res["spread"]["decode_tokens_per_s"]
    assert len(spread["runs"]) == 3 and spread["lo"] <= res["decode_tokens_per_s"] <= spread["hi"]
    assert res["decode_tokens_per_s"] == sorted(spread["runs"])[1]
    row = {"decode_tokens_per_s": res["decode_tokens_per_s"], "spread": res["spread"]}
    assert f"[{spread['lo']:.4g}, {spread['hi']:.4g}]" in markdown([row], ["decode_tokens_per_s"])
