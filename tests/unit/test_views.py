"""Report views, registered by name: the quantized study's view turns compared runs into its
table and the accuracy table auto reads back; the selection view names what auto served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.report import infer_row
from experiments.views import get_view
from framework.comm.accuracy import accuracy_rows


def _run(strategy: str, options: dict, ratio: float, world_size: int = 2) -> dict:
    ppl = {
        "text": "python-docs",
        "sha256": "ab" * 32,
        "tokens": 2048,
        "exact": 12.0,
        "strategy": 12.0 * ratio,
        "ratio": ratio,
        "ratio_lo": ratio - 0.01,
        "ratio_hi": ratio + 0.02,
        "kl_per_token": (ratio - 1) / 10,
        "top1_agreement": 0.9,
    }
    return {
        "status": "ok",
        "strategy": strategy,
        "strategy_options": options,
        "world_size": world_size,
        "exact": strategy == "naive",
        "decode_tokens_per_s": 10.0,
        "comm_extra": {"auto_shm_calls": 4, "auto_untuned_calls": 0},
        "numerics": {"perplexity": ppl, "wire_bytes_vs_exact": 0.28, "first_divergence": 3},
    }


def test_quantized_view_writes_the_accuracy_table_auto_reads(tmp_path: Path) -> None:
    rows = [
        infer_row(_run("naive", {}, 1.0), "0"),
        infer_row(_run("quantized", {"fmt": "int8", "block": 32, "min_bytes": 0}, 1.004), "0"),
        infer_row(_run("quantized", {"fmt": "int4", "block": 32}, 1.15), "0"),
    ]
    paths = get_view("quantized")(rows, tmp_path)
    assert {p.name for p in paths} == {"README.md", "accuracy_smollm2.json", "quantized.png"}
    table = accuracy_rows(str(tmp_path / "accuracy_smollm2.json"), 2)
    assert sorted(table) == ["quantized:block=32,fmt=int4", "quantized:block=32,fmt=int8"]
    assert table["quantized:block=32,fmt=int8"]["ppl_change_hi"] == pytest.approx(0.024)
    assert "| 2 | quantized:block=32,fmt=int4 |" in (tmp_path / "README.md").read_text()


def test_selection_view_and_unknown_views(tmp_path: Path) -> None:
    run = _run("auto", {"error_budget": {"ppl_change": 0.005}}, 1.0)
    get_view("selection")([infer_row(run, "0")], tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "within {'ppl_change': 0.005}" in text and "shm 4" in text
    with pytest.raises(ValueError, match="unknown report view 'nope'"):
        get_view("nope")


def test_error_bars_only_from_several_runs(tmp_path: Path, monkeypatch) -> None:
    """A single run draws no error bar (not a zero-height one); repeats draw their interval."""
    import matplotlib.axes

    from experiments.report import _plot_infer

    bars: list[int] = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "errorbar",
        lambda self, x, *a, **k: bars.append(len(x)) or real(self, x, *a, **k),
    )

    def row(name: str, runs: list[float]) -> dict:
        r = infer_row({**_run(name, {}, 1.0), "world_size": 2}, "0")
        r["spread"] = {
            "decode_tokens_per_s": {
                "median": runs[0],
                "lo": min(runs),
                "hi": max(runs),
                "runs": runs,
            }
        }
        return r

    _plot_infer([row("naive", [10.0]), row("shm", [20.0])], tmp_path)
    assert bars == []
    _plot_infer([row("naive", [10.0, 9.0, 11.0]), row("shm", [20.0])], tmp_path)
    assert bars == [1]  # naive's interval, nothing for shm's single run


def _compared(strategy: str, ttfts: list[float], waits: list[float], seed_model: str) -> dict:
    """One strategy's result in a fusion_overlap job: three rounds of TTFT and prefill wait."""
    spread = {
        "ttft_s": {"runs": ttfts},
        "prefill_exposed_comm_s": {"runs": waits},
        "itl_p50_s": {"runs": [0.1, 0.1, 0.1]},
        "exposed_comm_share": {"runs": [0.5, 0.5, 0.5]},
    }
    return {
        "status": "ok",
        "strategy": strategy,
        "world_size": 2,
        "model": seed_model,
        "prompt_len": 1024,
        "same_tokens_as_exact": True,
        "spread": spread,
    }


def test_fusion_overlap_view_pools_jobs_and_names_only_clear_wins(tmp_path: Path) -> None:
    """Two jobs (seeds) per point pool their rounds; a strategy is named in the verdict only
    where its TTFT ratio interval lies above 1, and the removed share is of naive's wait."""
    rows = []
    for job in ("0", "1"):
        rows += [
            infer_row(_compared("naive", [2.0, 2.1, 1.9], [0.6, 0.6, 0.6], "small"), job),
            infer_row(_compared("shm", [1.0, 1.1, 0.9], [0.15, 0.15, 0.15], "small"), job),
            infer_row(_compared("overlap", [1.5, 2.5, 2.0], [0.3, 0.3, 0.3], "small"), job),
        ]
    get_view("fusion_overlap")(rows, tmp_path)
    text = (tmp_path / "README.md").read_text()
    shm = next(line for line in text.splitlines() if "| shm |" in line)
    assert "| 2.00 [" in shm and "+75%" in shm and "| 2 | True |" in shm
    assert "**shm** prefills 2.00x faster" in text and "**overlap**" not in text
    assert (tmp_path / "fusion_overlap.png").stat().st_size > 0


def test_shm_modes_view_finds_the_crossover_per_world_size(tmp_path: Path) -> None:
    def row(p: int, size: int, one: float, two: float) -> dict:
        return {
            "strategy": "shm",
            "baseline": "shm:mode=twoshot",
            "world_size": str(p),
            "size": str(size),
            "time_us": str(one),
            "baseline_time_us": str(two),
        }

    rows = [
        row(2, 256, 5.0, 6.0),
        row(2, 1024, 6.0, 6.0),
        row(2, 4096, 9.0, 7.0),
        row(2, 16384, 8.0, 9.0),  # one-shot wins again later: not a crossover
        row(4, 256, 9.0, 8.0),
        row(4, 1024, 9.0, 10.0),
        {"status": "ok", "strategy": "naive"},  # an inference row: not the view's
    ]
    paths = get_view("shm_modes")(rows, tmp_path)
    assert json.loads((tmp_path / "crossover.json").read_text()) == {"2": 1024, "4": 0}
    text = paths[0].read_text()
    assert "| 2 | 4096 | 9 | 7 | 0.778 |" in text and "- world size 4: 0 B" in text
    with pytest.raises(ValueError, match="experiment=shm_modes"):
        get_view("shm_modes")([{"status": "ok"}], tmp_path)


def test_sequence_parallel_view_pairs_each_sp_run_with_its_all_reduce_run(tmp_path: Path) -> None:
    def run(sp: bool, ttft: float, prompt: int = 64) -> dict:
        ops = (
            {"all_reduce": {"collectives": 24}}
            if not sp
            else {"reduce_scatter": {"collectives": 25}, "all_gather": {"collectives": 24}}
        )
        return {
            "status": "ok",
            "strategy": "shm",
            "world_size": 2,
            "prompt_len": prompt,
            "sequence_parallel": sp,
            "ttft_s": ttft,
            "itl_p50_s": 0.1,
            "per_op": {"prefill": ops},
            "sp_padded_tokens": 3,
        }

    rows = [run(False, 0.2), run(True, 0.3), run(True, 0.5, prompt=128)]  # the last: no pair
    get_view("sequence_parallel")(rows, tmp_path)
    pairs = json.loads((tmp_path / "runs.json").read_text())
    assert [(p["prompt_len"], p["ttft_sp_over_ar"]) for p in pairs] == [(64, 1.5)]
    assert (pairs[0]["prefill_collectives_ar"], pairs[0]["prefill_collectives_sp"]) == (24, 49)
    assert (tmp_path / "sp.png").stat().st_size > 0
