"""The numerics block and the flat summary on known inputs: the metrics mean what they say."""

from __future__ import annotations

import pytest
import torch

from framework.run.numerics import compare, first_divergence


def test_compare_on_known_logits() -> None:
    ref = [torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])]
    same = compare(ref, ref, [[1, 0]], [[1, 0]], [[1, 0]], 10, 40)
    assert same["agreement"] == 1.0 and same["kl_mean"] == 0.0
    assert same["first_divergence"] is None and same["wire_bytes_vs_exact"] == 0.25
    flipped = [ref[0], torch.tensor([[0.0, 1.0, 0.0]])]
    got = compare(flipped, ref, [[1, 1]], [[1, 0]], [[1, 2]], 10, 10)
    assert got["agreement"] == 0.5 and got["first_divergence"] == 1
    assert got["logit_max_abs_err"] == 1.0 and got["logit_mean_abs_err"] == pytest.approx(2 / 6)
    p = torch.softmax(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 0)
    assert got["kl_mean"] == pytest.approx(float((p * (p / q).log()).sum()) / 2)


def test_first_divergence_per_sequence() -> None:
    assert first_divergence([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [1, 5, 3]]) == [None, 1]


def test_tracker_summary_carries_numerics_and_intervals() -> None:
    from framework.run.results import flat_summary

    got = flat_summary(
        {
            "decode_tokens_per_s": 10.0,
            "tokens": [[1]],
            "numerics": {"kl_mean": 0.5, "first_divergence": None},
            "spread": {"decode_tokens_per_s": {"median": 10.0, "lo": 9.0, "hi": 11.0}},
        }
    )
    assert got == {
        "decode_tokens_per_s": 10.0,
        "numerics/kl_mean": 0.5,
        "decode_tokens_per_s_lo": 9.0,
        "decode_tokens_per_s_hi": 11.0,
    }


def test_compared_runs_keep_one_block_each_in_the_tracker() -> None:
    from framework.run.results import flat_summary

    def run(opts: dict) -> dict:
        return {"strategy": "quantized", "strategy_options": opts, "decode_tokens_per_s": 1.0}

    flat = flat_summary(
        {"runs": [run({"fmt": "int8"}), run({"fmt": "int4"}), run({"fmt": "int4"})]}
    )
    assert {k for k in flat if k.endswith("decode_tokens_per_s")} == {
        "quantized:fmt=int8/decode_tokens_per_s",
        "quantized:fmt=int4/decode_tokens_per_s",
        "quantized:fmt=int4#2/decode_tokens_per_s",
    }
