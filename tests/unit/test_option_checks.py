"""Every bad value is refused before a rank starts, by the strategy's own rules, in words that
name the option, the value and what is allowed (issue 22, fault 7). Each case here was either
accepted and failed 14-28 s later on the ranks, or refused in the library's words.

The checks are one path: ``Communicator.check_options`` runs in the constructor and in a
run's validation alike, so a value refused here is refused in the same words on a rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config

import experiments.configs  # noqa: F401
from experiments.common import run_spec
from framework import build_communicator
from framework.run.spec import ConfigError, load_prompts, validate_run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy=quantized", "strategy.fmt=int3"], r"fmt must be one of \[.*\], got 'int3'"),
        (["strategy=quantized", "strategy.min_bytes=-1"], "min_bytes must be >= 0, got -1"),
        (["strategy=quantized", "strategy.block=12"], "block must be a multiple of 8, got 12"),
        (["strategy=shm", "strategy.mode=threeshot"], "mode must be one of .* got 'threeshot'"),
        (["strategy=auto", "strategy.table=nonexistent"], "table: tuning table 'nonexistent'"),
        (["strategy=auto", "strategy.candidates=[bogus]"], "candidate='bogus' is not an algo"),
        (["strategy=shm", "strategy.chunk_bytes=abc"], "chunk_bytes must be an integer, got 'abc'"),
        (["strategy=tree", "strategy.chunk_bytes=100.5"], "must be an integer, got 100.5"),
        (
            ["strategy=bucketed", "+strategy.inner_options={foo: 1}"],
            r"'bucketed', inner='naive': strategy 'naive' has no option\(s\) \['foo'\]",
        ),
        (["strategy=twoshot", "strategy.inner=bucketed"], "inner='bucketed' is not an algorithm"),
        (["strategy=naive", "strategy.validate=3"], "validate must be true or false, got 3"),
        (["workload.warmup_tokens=200"], "workload.warmup_tokens 200 exceeds the model context"),
    ],
)
def test_bad_values_are_refused_before_spawning(overrides: list[str], message: str) -> None:
    cfg = compose_config("logger=none", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate_run(run_spec(cfg, "."))


def test_the_constructor_refuses_in_the_same_words_before_touching_the_wire() -> None:
    """No process group exists in this process: the check runs before any of it is needed."""
    with pytest.raises(ValueError, match="strategy 'quantized': fmt must be one of"):
        build_communicator("quantized", fmt="int3")
    with pytest.raises(ValueError, match="strategy 'shm': chunk_bytes must be an integer"):
        build_communicator("shm", chunk_bytes="abc")


@pytest.mark.parametrize(
    "content, message",
    [
        ('[["2"]]', r"prompt 0 holds \['2'\]; token ids are integers in \[0, "),
        ("[[1.7, 2.2]]", r"prompt 0 holds \[1.7, 2.2\]"),  # was silently truncated to [1, 2]
        ("[[1, true]]", r"prompt 0 holds \[True\]"),
        ("not json", "is not JSON"),
        ('"2"', "must hold a JSON list of non-empty token-id lists"),
        ("[2]", "must hold a JSON list of non-empty token-id lists"),
    ],
)
def test_bad_prompt_files_are_refused_naming_the_file(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(content)
    cfg = compose_config("logger=none", f"workload.prompts={path}")
    with pytest.raises(ConfigError, match=message) as err:
        validate_run(run_spec(cfg, "."))
    assert str(path) in str(err.value)


def test_a_garbage_tokenizer_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    (tmp_path / "config.json").write_text(json.dumps({}))
    cfg = compose_config("logger=none", "workload.text=[hello]", f"model.checkpoint={tmp_path}")
    spec = run_spec(cfg, ".")
    with pytest.raises(ValueError, match=r"tokenizer.json is not a valid tokenizer.json"):
        load_prompts(spec, 100)


def test_generate_refuses_float_token_ids() -> None:
    """The model's own entry point too: a float id was truncated by ``torch.tensor(long)``."""
    from types import SimpleNamespace

    from framework.model import get_config
    from framework.model.generate import generate

    model = SimpleNamespace(cfg=get_config("tiny"))  # only its config is read before refusing
    with pytest.raises(ValueError, match=r"prompt 0 holds \[1.7\]; token ids are integers"):
        generate(model, [[1.7, 2]], 2)
