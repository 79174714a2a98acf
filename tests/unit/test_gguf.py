"""GGUF conversion (framework.model.gguf) and the trained-model cache (framework.model.trained),
on tiny GGUF files the tests write themselves: nothing large is downloaded.

The reference is transformers' own GGUF loader reading the same file (its dequantizing, its
un-permuting, its tokenizer conversion), and transformers running the converted checkpoint."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from gguf_files import write_gguf

from framework.comm.fused import FusedFromCollectives
from framework.model import trained
from framework.model.gguf import convert_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    src = write_gguf(root / "tiny.gguf")
    return src, convert_gguf(src, root / "hf")


def test_conversion_matches_transformers_gguf_loader(converted) -> None:
    """Same tensors (bit for bit), same config, same token ids as transformers reading the
    GGUF file itself; the head is tied (the file has no output.weight)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF path needs it
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    src, out = converted
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    mine = load_file(out / "model.safetensors")
    theirs = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(mine[name], t), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in mine
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert cfg[key] == getattr(ref.config, key), key
    tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["the cat sat", "  the\tcat<|im_start|>x", "héllo, 世界"]:
        assert ours.encode(text).ids == tok(text).input_ids, text


def test_converted_checkpoint_runs_like_transformers(converted) -> None:
    """The converted directory, loaded by commlab's loader (TP 1) and by transformers, gives
    the same greedy tokens and logits within 1e-5."""
    transformers = pytest.importorskip("transformers")
    from framework.model.checkpoint import load_hf_checkpoint
    from framework.model.generate import generate

    _, out = converted
    ref = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    prompt = [[1, 50, 60, 70, 80]]
    want = ref.generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False)[0, 5:].tolist()
    model = load_hf_checkpoint(out, _Identity())
    got = generate(model, prompt, 6, return_logits=True)
    assert got.tokens[0] == want
    with torch.no_grad():
        logits = ref(torch.tensor([prompt[0] + want[:-1]])).logits[0, 4:]
    torch.testing.assert_close(torch.stack(got.logits)[:, 0], logits, atol=1e-5, rtol=0)


class _Identity(FusedFromCollectives):
    """TP 1's communicator: the sum over one rank is the tensor itself."""

    class _Done:
        def __init__(self, x):
            self.x = x

        def wait(self):
            return self.x

    def all_reduce(self, x):
        return self._Done(x)

    reduce_scatter = all_gather = all_reduce


def test_untied_head_is_kept(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = convert_gguf(write_gguf(tmp_path / "u.gguf", tied=False), tmp_path / "hf")
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_bad_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match=r"corrupt\.gguf is not a valid GGUF file"):
        convert_gguf(bad, tmp_path / "a")
    other = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not a Llama model"):
        convert_gguf(other, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _fake_trained(monkeypatch, tmp_path: Path) -> Path:
    """A trained model whose wheel (holding the tiny GGUF) already sits in the cache."""
    gguf = write_gguf(tmp_path / "tiny.gguf")
    model = trained.TrainedModel(
        requirement="llm-tiny==0.0.1",
        package="llm_tiny_commlab_test",
        member="llm_tiny_commlab_test/tiny.gguf",
        dirname="tiny-q8",
    )
    monkeypatch.setitem(trained.TRAINED, "tiny-trained", model)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(
        cache / "wheels" / "llm_tiny_commlab_test-0.0.1-py3-none-any.whl", "w"
    ) as z:
        z.write(gguf, model.member)
    return cache


def test_trained_model_is_converted_once_and_reused(monkeypatch, tmp_path: Path) -> None:
    cache = _fake_trained(monkeypatch, tmp_path)
    said: list[str] = []
    path = trained.trained_checkpoint("tiny-trained", str(cache), log=said.append)
    assert path == cache / "models" / "tiny-q8"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert len(said) == 1 and str(path) in said[0]  # the cache location is printed
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert trained.trained_checkpoint("tiny-trained", str(cache), log=said.append) == path
    assert len(said) == 1 and (path / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setenv("COMMLAB_CACHE", str(cache))  # the environment names the same cache
    assert trained.trained_checkpoint("tiny-trained", log=said.append) == path


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path: Path) -> None:
    _fake_trained(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    monkeypatch.setattr(trained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'commlab\[models\]'"):
        trained.trained_checkpoint("tiny-trained", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown trained model 'nope'"):
        trained.trained_checkpoint("nope", str(tmp_path))


def test_smollm2_config_resolves_through_the_cache(monkeypatch, tmp_path: Path) -> None:
    """model=smollm2 composes, and its spec reads the converted checkpoint's shape."""
    from conftest import compose_config

    from experiments.common import run_spec
    from framework.run.spec import model_config

    cache = _fake_trained(monkeypatch, tmp_path)
    monkeypatch.setitem(trained.TRAINED, "smollm2", trained.TRAINED["tiny-trained"])
    spec = run_spec(compose_config("model=smollm2", f"model.cache_dir={cache}"), str(tmp_path))
    cfg = model_config(spec.model)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (4, 2, True)


def test_tokenizer_split_and_bos_follow_the_file(tmp_path: Path) -> None:
    """A pre-tokenizer other than GPT-2's split is refused, not tokenised wrongly; a file that
    asks for BOS gets it."""
    from tokenizers import Tokenizer

    llama3 = write_gguf(tmp_path / "l3.gguf", pre="llama-bpe")
    with pytest.raises(ValueError, match="pre-tokenizer 'llama-bpe' is not supported"):
        convert_gguf(llama3, tmp_path / "a")
    out = convert_gguf(write_gguf(tmp_path / "bos.gguf", add_bos=True), tmp_path / "b")
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode("the cat").ids
    assert (
        ids[0] == 1
        and ids[1:]
        == Tokenizer.from_file(
            str(convert_gguf(write_gguf(tmp_path / "n.gguf"), tmp_path / "c") / "tokenizer.json")
        )
        .encode("the cat")
        .ids
    )


def test_a_cut_short_wheel_is_fetched_again(monkeypatch, tmp_path: Path) -> None:
    cache = _fake_trained(monkeypatch, tmp_path)
    good = next((cache / "wheels").glob("*.whl"))
    kept = tmp_path / "good.whl"
    kept.write_bytes(good.read_bytes())
    good.write_bytes(b"PK cut short")
    fetched: list[Path] = []

    def wheel(model, root, log):  # the cache's wheel first; then "the index" gives a good one
        if not good.exists():
            good.write_bytes(kept.read_bytes())
            fetched.append(good)
        return good

    monkeypatch.setattr(trained, "_wheel", wheel)
    said: list[str] = []
    path = trained.trained_checkpoint("tiny-trained", str(cache), log=said.append)
    assert (path / "model.safetensors").is_file() and fetched == [good]
    assert "unreadable" in said[0]
