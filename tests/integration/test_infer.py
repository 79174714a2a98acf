"""The infer entry point and the Hydra layer: compose, validate, run, sweep, report, track."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, compose_config, run_on_rank

import experiments.configs  # noqa: F401
from experiments.common import run_spec
from framework.run.columns import HEADLINE
from framework.run.spec import ConfigError, validate_run


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def infer(*overrides: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.infer", *overrides, "progress=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
    )


def cfg_for(*overrides: str, name: str = "infer"):
    return compose_config(*overrides, name=name)


def test_corrupt_checkpoint_fails_on_every_rank(pools, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 64,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5,
                "hidden_act": "silu",
            }
        )
    )
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    spec = run_spec(cfg_for("model=hf", f"model.checkpoint={ckpt}"), str(tmp_path))
    for rank, res in enumerate(pools(2).run(run_on_rank, spec)):
        assert res["status"] == "raised", f"rank {rank} did not fail: {res}"
        assert "safetensors" in res["error"].lower(), f"rank {rank}: {res['error']}"


@pytest.mark.full
def test_infer_runs_and_strategies_agree(pools, tmp_path: Path) -> None:
    """Two strategies, same seed: same tokens; results.json carries every documented key.

    naive runs from the command line (spawned ranks, results.json, step log), bucketed runs
    on the long-lived ranks as under torchrun, and a real torchrun launch closes the loop."""
    results = {}
    run_dir = tmp_path / "naive"
    r = infer(
        "strategy=naive",
        "workload.micro_batches=2",
        "workload.new_tokens=4",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results["naive"] = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "steps" / "metrics.csv").exists()
    spec = run_spec(
        cfg_for("strategy=bucketed", "workload.micro_batches=2", "workload.new_tokens=4"),
        str(tmp_path / "bucketed"),
    )
    results["bucketed"] = pools(2).run(run_on_rank, spec)[0]
    for res in results.values():
        for key in (*HEADLINE, "tokens", "status"):
            assert key in res, key
        assert res["status"] == "ok" and res["tokens_agree_across_ranks"]
        assert res["allreduce_calls_per_token"] == 2 * 2 * 2  # layers x blocks x micro-batches
    assert results["naive"]["tokens"] == results["bucketed"]["tokens"]
    # under torchrun the launcher's processes are used (no spawning): same tokens
    run_dir = tmp_path / "torchrun"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "experiments.infer",
            "strategy=naive",
            "workload.micro_batches=2",
            "workload.new_tokens=4",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("decode_tokens_per_s=") == 1  # rank 0 reports, rank 1 does not
    assert (
        json.loads((run_dir / "results.json").read_text())["tokens"] == results["naive"]["tokens"]
    )
    assert results["bucketed"]["collectives_per_token"] == 4  # the two micro-batches fused
    assert results["naive"]["collectives_per_token"] == 8


@pytest.mark.slow
@pytest.mark.ci
def test_multirun_with_a_failing_job_reports_and_tracks(tmp_path: Path) -> None:
    """A good and a bad micro-batch count: both jobs run, the failure is marked."""
    sweep = tmp_path / "sweep"
    r = infer(
        "-m",
        "strategy=async_overlap",
        "workload.micro_batches=2,9",
        "workload.new_tokens=3",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
        WANDB_MODE="offline",
    )
    assert r.returncode != 0  # a job failed, so the sweep exits non-zero...
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2  # ...but every job ran
    statuses = {}
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        statuses[(res["strategy"], res.get("micro_batches"))] = res["status"]
        assert list(job.glob("wandb/offline-run-*/run-*.wandb")), f"no offline W&B run in {job}"
        # the W&B run is finished either way, with exit code 1 when the job failed
        log = next(job.glob("wandb/offline-run-*/logs/debug.log")).read_text()
        want = 1 if res["status"] == "failed" else 0
        assert f"got exitcode: {want}" in log, f"W&B run of {job} not finished with {want}"
    assert sorted(statuses.values()) == ["failed", "ok"]
    report = (sweep / "report.md").read_text()
    assert report.count("| ok |") == 1 and report.count("| failed |") == 1
    assert (sweep / "report.csv").exists()
    assert (sweep / "infer_decode_tokens_per_s.png").stat().st_size > 1000


@pytest.mark.full
def test_same_seed_same_tokens_and_flat_memory(pools, tmp_path: Path) -> None:
    """Determinism across repeated runs, and a short soak: resident memory stays flat after
    prefill (no per-step leak) and pending handles stay bounded (issue: soak)."""
    spec = run_spec(
        cfg_for(
            "strategy=double_buffer",
            "workload.micro_batches=2",
            "workload.new_tokens=200",
            "model.max_seq_len=256",
        ),
        str(tmp_path),
    )
    runs = [pools(2).run(run_on_rank, spec)[0] for _ in range(2)]
    assert all(res["status"] == "ok" for res in runs), runs
    assert runs[0]["tokens"] == runs[1]["tokens"]
    for res in runs:
        assert res["rss_growth"] < 0.05, res["rss_growth"]
        assert res["pending_max"] <= 2 * 2 * 2  # at most one layer's handles per micro-batch


def _checkpoint_with_tokenizer(path: Path) -> Any:
    """A tiny Llama checkpoint written by transformers, and a word-level tokenizer built
    offline (BOS prepended by its post-processor, as Llama's tokenizer.json does)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["the", "a", "cat", "dog", "sat", "ran", "far", "on", "mat", "and"]
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 64)})  # every model id decodes
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


def test_text_prompts_are_encoded_and_continuations_decoded(pools, tmp_path: Path) -> None:
    from framework.run.spec import load_prompts

    ckpt = tmp_path / "ckpt"
    tok = _checkpoint_with_tokenizer(ckpt)
    texts = ["the cat sat on the mat", "a dog ran"]
    cfg = cfg_for(
        "model=hf",
        f"model.checkpoint={ckpt}",
        f"workload.text=[{texts[0]},{texts[1]}]",
        "workload.new_tokens=5",
    )
    spec = run_spec(cfg, str(tmp_path))
    prompts = load_prompts(spec, 64)
    assert prompts == [[1, 2, 4, 6, 9, 2, 10], [1, 3, 5, 7]]  # <s> + the words' ids
    res = pools(2).run(run_on_rank, spec)[0]
    assert res["status"] == "ok", res
    assert res["text"] == texts
    assert res["continuations"] == [tok.decode(t) for t in res["tokens"]]
    assert all(len(c.split()) == 5 for c in res["continuations"])  # 5 words, special-free
    with pytest.raises(ConfigError, match=r"needs a model with a tokenizer"):
        validate_run(run_spec(cfg_for("workload.text=[hello]"), "."))
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer\.json does not exist"):
        validate_run(spec)


def test_compare_interleaves_strategies_on_the_same_ranks(pools, tmp_path: Path) -> None:
    """One job, three strategies, two rounds: each strategy's result carries both rounds
    (median and interval), the exact ones decode the job's own tokens, and the report reads
    the job as three rows with the text of each beside the exact one."""
    from experiments.common import write_json_atomic
    from experiments.report import collect, write_report

    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    cfg = cfg_for(
        "model=hf",
        f"model.checkpoint={ckpt}",
        "workload.text=[the cat sat on the mat,a dog ran]",
        'compare=[tree,"quantized:fmt=int4,block=32","bucketed:inner=quantized"]',
        "workload.repeats=2",
        "workload.new_tokens=4",
    )
    spec = run_spec(cfg, str(tmp_path))
    res = pools(2).run(run_on_rank, spec)[0]
    assert res["status"] == "ok", res
    assert res["compared"] == ["naive", "tree", "quantized", "bucketed"] and res["rounds"] == 2
    naive, tree, quant, fused = res["runs"]
    # exactness as built: bucketing is exact, over a quantized wire it is not
    assert (naive["exact"], tree["exact"], quant["exact"], fused["exact"]) == (1, 1, 0, 0)
    assert quant["strategy_options"] == {"fmt": "int4", "block": 32}
    for run in res["runs"]:
        assert run["repeats"] == 2
        assert len(run["spread"]["decode_tokens_per_s"]["runs"]) == 2
    assert naive["same_tokens_as_exact"] and tree["same_tokens_as_exact"]
    assert tree["tokens"] == naive["tokens"] and res["exact_reference"] == "naive"
    write_json_atomic(tmp_path / "results.json", {"job_type": "infer", **res})
    rows, _ = collect(tmp_path)
    assert [r["strategy"] for r in rows] == ["naive", "tree", "quantized", "bucketed"]
    report = write_report(tmp_path).read_text()
    assert "## Text" in report and "| naive | exact |" in report
    assert report.count("Prompt ") == 2


def test_perplexity_on_the_evaluation_text(pools, tmp_path: Path) -> None:
    """A trained-model-shaped checkpoint (converted from a tiny GGUF) scores the standard
    library's documentation: exact communication against itself is a ratio of exactly 1, a
    4-bit wire is not, and the text is recorded by name and hash."""
    import hashlib

    pytest.importorskip("gguf")
    from gguf_files import write_gguf

    from framework.model.gguf import convert_gguf
    from framework.run.perplexity import eval_text

    ckpt = convert_gguf(write_gguf(tmp_path / "t.gguf"), tmp_path / "ckpt")
    cfg = cfg_for(
        "model=hf",
        f"model.checkpoint={ckpt}",
        "workload.text=[the cat]",
        "workload.new_tokens=3",
        "workload.reference=exact",
        "workload.eval_text=python-docs",
        "workload.eval_tokens=48",
        "workload.eval_chunk=16",
        'compare=["quantized:fmt=int4,block=32"]',
    )
    res = pools(2).run(run_on_rank, run_spec(cfg, str(tmp_path)))[0]
    assert res["status"] == "ok", res
    exact, quant = (r["numerics"]["perplexity"] for r in res["runs"])
    # the same decode on the same arithmetic sends the same bytes (the text is not counted)
    assert res["runs"][0]["numerics"]["wire_bytes_vs_exact"] == 1.0
    text, digest = eval_text("python-docs")
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    assert exact["text"] == "python-docs" and exact["sha256"] == digest and exact["tokens"] == 48
    assert exact["ratio"] == exact["ratio_lo"] == exact["ratio_hi"] == 1.0
    assert exact["kl_per_token"] == 0.0 and exact["top1_agreement"] == 1.0
    assert quant["exact"] == exact["exact"] and quant["ratio"] != 1.0
    assert quant["ratio_lo"] <= quant["ratio"] <= quant["ratio_hi"] and quant["kl_per_token"] > 0
    bad = cfg_for("workload.reference=exact", "workload.eval_text=nope")
    with pytest.raises(ConfigError, match="unknown evaluation text 'nope'"):
        validate_run(run_spec(bad, "."))


@pytest.mark.full
def test_command_line_prints_the_continuation(tmp_path: Path) -> None:
    """``python -m experiments.infer ... 'workload.text=[...]'`` shows the text it made."""
    ckpt = tmp_path / "ckpt"
    tok = _checkpoint_with_tokenizer(ckpt)
    r = infer(
        "model=hf",
        f"model.checkpoint={ckpt}",
        "workload.text=[the cat sat]",
        "workload.new_tokens=3",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'job'}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "job" / "results.json").read_text())
    assert res["continuations"] == [tok.decode(res["tokens"][0])]
    assert f"'the cat sat' -> {res['continuations'][0]!r}" in r.stdout
