"""Configuration, checked in-process: every config composes, the strategy yamls match the code's
options, and a bad configuration is refused before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONF, compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from experiments.common import run_spec
from framework import available_strategies, strategy_options
from framework.run.spec import ConfigError, validate_run


def test_one_config_file_per_strategy_and_no_drift() -> None:
    files = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
    assert files == available_strategies()
    for name in files:
        raw = OmegaConf.load(CONF / "strategy" / f"{name}.yaml")
        keys = set(raw) - {"name"}
        assert raw.name == name
        assert keys == set(strategy_options(name)), f"conf/strategy/{name}.yaml drifted"
        for k, default in strategy_options(name).items():
            if k != "timeout_s":  # interpolated from parallel.timeout_s
                assert raw[k] == default, f"{name}.{k}: yaml {raw[k]} != code {default}"


@pytest.mark.parametrize("group", ["strategy", "model", "workload", "parallel", "logger"])
def test_every_group_option_composes(group: str) -> None:
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        extra = ["model.checkpoint=/nonexistent"] if (group, option) == ("model", "hf") else []
        cfg = compose_config(f"{group}={option}", *extra)
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*")))
def test_every_experiment_composes(experiment: str) -> None:
    name = "bench" if experiment.startswith("bench") else "infer"
    cfg = compose_config(f"experiment={experiment}", name=name)
    OmegaConf.to_container(cfg, resolve=True)


def test_structured_config_rejects_bad_types() -> None:
    compose_config("workload.batch_size=3")  # the same key with a good value composes
    with pytest.raises(ConfigCompositionException) as bad_type:
        compose_config("workload.batch_size=abc")
    assert isinstance(bad_type.value.__cause__, ValidationError)  # the schema's type check
    with pytest.raises(MissingConfigException):
        compose_config("strategy=nope")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.world_size=25"], "larger than num_heads=24"),
        (["parallel.world_size=0"], "world_size must be > 0"),
        (["workload.micro_batches=8"], "larger than"),
        (["workload.prompt_len=200"], "exceeds the model context"),
        (["strategy=bucketed", "strategy.bucket_bytes=-1"], "bucket_bytes must be > 0"),
        (["parallel.backend=nccl"], "CUDA devices"),
        (["parallel.device=cuda"], "needs a CUDA device"),
        (["parallel.cuda_graphs=true"], "cuda_graphs=true needs CUDA tensors; this run is on cpu"),
        (
            ["strategy=bucketed", "parallel.cuda_graphs=true"],
            r"'bucketed' cannot be captured in a CUDA graph on gloo .* on gloo: none",
        ),
        (["model=hf", "model.checkpoint=/nonexistent/dir"], "not a directory"),
    ],
)
def test_bad_config_is_refused_before_spawning(overrides: list[str], message: str) -> None:
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate_run(run_spec(cfg, "."))


def test_entry_point_records_a_bad_config_before_spawning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """infer's main, in-process: the job is refused, recorded as failed, and no rank starts."""
    import experiments.infer
    import framework.run.runner

    def spawned(*args, **kwargs):
        raise AssertionError("ranks were launched for an invalid configuration")

    monkeypatch.setattr(framework.run.runner, "launch_ranks", spawned)
    cfg = compose_config(
        "parallel.world_size=0", "logger=none", "progress=false", hydra_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="world_size must be > 0"):
        experiments.infer.main(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and "world_size" in saved["error"]


def test_prompts_from_a_file(tmp_path: Path) -> None:
    from framework.run.spec import load_prompts

    good = tmp_path / "prompts.json"
    good.write_text(json.dumps([[1, 2, 3], [4, 5]]))
    spec = run_spec(compose_config(f"workload.prompts={good}", "workload.micro_batches=2"), ".")
    validate_run(spec)
    assert load_prompts(spec, 256) == [[1, 2, 3], [4, 5]]
    spec = run_spec(compose_config(f"workload.prompts={good}", "workload.micro_batches=3"), ".")
    with pytest.raises(ConfigError, match="larger than the 2 prompts"):
        validate_run(spec)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ConfigError, match="token-id lists"):
        validate_run(run_spec(compose_config(f"workload.prompts={bad}"), "."))
