"""The numerics block: exact strategies match the exact run (naive to the bit), a quantized
wire shows its error and its saving, and the metrics mean what they say on known inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, run_on_rank

import experiments.configs  # noqa: F401
from experiments.common import run_spec


def _numerics(pools, tmp_path: Path, strategy: str, *overrides: str) -> dict:
    cfg = compose_config(
        f"strategy={strategy}",
        "workload.reference=exact",
        "workload.new_tokens=6",
        "workload.warmup_tokens=0",
        *overrides,
    )
    res = pools(2).run(run_on_rank, run_spec(cfg, str(tmp_path / strategy)))[0]
    assert res["status"] == "ok", res
    return res["numerics"]


def test_exact_strategies_agree_with_the_exact_run(pools, tmp_path: Path) -> None:
    naive = _numerics(pools, tmp_path, "naive")
    # the same communicator twice: the teacher-forced run must reproduce the exact one's bits
    assert naive["logit_max_abs_err"] == 0.0 and naive["kl_mean"] == 0.0
    assert naive["agreement"] == 1.0 and naive["first_divergence"] is None
    assert naive["wire_bytes_vs_exact"] == 1.0
    tree = _numerics(pools, tmp_path, "twoshot", "strategy.inner=shm")
    assert tree["agreement"] == 1.0 and tree["first_divergence"] is None
    assert tree["logit_max_abs_err"] <= 1e-4  # float rounding of another summation order


def test_an_exact_strategy_agrees_with_itself_when_sampling(pools, tmp_path: Path) -> None:
    """The reference and teacher-forced decodes sample as the measured run did (temperature,
    top-k, seed): with exact communication nothing may differ (they decoded greedily, and
    the exact strategy 'diverged from itself' at step 0)."""
    got = _numerics(pools, tmp_path, "naive", "workload.temperature=1.0", "workload.top_k=50")
    assert got["agreement"] == 1.0 and got["first_divergence"] is None, got
    assert got["diverged_sequences"] == 0 and got["logit_max_abs_err"] == 0.0, got


def test_quantized_shows_its_error_and_saving(pools, tmp_path: Path) -> None:
    int4 = _numerics(pools, tmp_path, "quantized", "strategy.fmt=int4", "strategy.block=32")
    int8 = _numerics(pools, tmp_path, "quantized", "strategy.fmt=int8")
    assert 0 < int8["logit_max_abs_err"] < int4["logit_max_abs_err"]
    assert 0 < int8["kl_mean"] < int4["kl_mean"]
    # ring all-reduce at p=2 sends the payload once; int4 at block 32 sends 4.5 bits/value
    assert int4["wire_bytes_vs_exact"] == pytest.approx((0.5 + 4 / 32) / 4, rel=1e-6)
