"""Single-process tests of the TP Llama model, its checkpoint loader and generation.

Tensor parallelism is simulated with threads inside one process (ThreadGroup below);
the real multi-process torch.distributed tests live elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from framework.comm.fused import FusedFromCollectives
from framework.model import (
    PRESETS,
    ModelConfig,
    TPLlama,
    full_param_shapes,
    get_config,
    param_shard,
)
from framework.model.checkpoint import config_from_hf, load_hf_checkpoint
from framework.model.generate import generate, left_pad
from framework.model.layers import kv_runs
from framework.model.sharding import rank_layout, slice_dim

TINY = PRESETS["tiny"]


# ----------------------------------------------------------------------------------------
# Stand-in communicators


class _Done:
    def __init__(self, x: Tensor, log: list[tuple[str, int]], ident: int) -> None:
        self.x, self.log, self.ident = x, log, ident

    def wait(self) -> Tensor:
        self.log.append(("wait", self.ident))
        return self.x


class CountingComm(FusedFromCollectives):
    """World size 1: all_reduce is the identity; records issue/wait order."""

    def __init__(self) -> None:
        self.calls = 0
        self.log: list[tuple[str, int]] = []

    def all_reduce(self, x: Tensor) -> _Done:
        ident = self.calls
        self.calls += 1
        self.log.append(("issue", ident))
        return _Done(x, self.log, ident)


class ThreadGroup:
    """Sums partials across ranks that run in separate threads of this process.

    Calls are matched by per-rank sequence number (every rank issues the same sequence
    of all-reduces). Issuing never blocks, only wait() does, which is exactly the
    contract the model relies on for overlap; so a wrong schedule would deadlock here
    (turned into an error by the timeout) rather than pass silently.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.cond = threading.Condition()
        self.parts: dict[int, list[Tensor | None]] = {}
        self.sums: dict[int, Tensor] = {}

    def comm(self, rank: int) -> Any:
        group = self

        class Handle:
            def __init__(self, key: int, op: str) -> None:
                self.key, self.op = key, op

            def wait(self) -> Tensor:
                with group.cond:
                    ok = group.cond.wait_for(
                        lambda: all(p is not None for p in group.parts[self.key]), timeout=60
                    )
                    if not ok:
                        raise TimeoutError(f"{self.op} {self.key} never completed")
                    parts = group.parts[self.key]
                    if self.op == "all_gather":
                        return torch.cat(parts)
                    if self.key not in group.sums:
                        # Fixed rank order -> every rank gets bit-identical sums.
                        total = parts[0]
                        for part in parts[1:]:
                            total = total + part
                        group.sums[self.key] = total
                    total = group.sums[self.key]
                    if self.op == "reduce_scatter":
                        rows = total.shape[0] // group.size
                        return total[rank * rows : (rank + 1) * rows].clone()
                    return total.clone()

        class Comm(FusedFromCollectives):
            def __init__(self) -> None:
                self.calls = 0
                self.ops: list[str] = []

            def _post(self, x: Tensor, op: str) -> Handle:
                key = self.calls
                self.calls += 1
                self.ops.append(op)
                with group.cond:
                    group.parts.setdefault(key, [None] * group.size)[rank] = x
                    group.cond.notify_all()
                return Handle(key, op)

            def all_reduce(self, x: Tensor) -> Handle:
                return self._post(x, "all_reduce")

            def reduce_scatter(self, x: Tensor) -> Handle:
                return self._post(x, "reduce_scatter")

            def all_gather(self, x: Tensor) -> Handle:
                return self._post(x, "all_gather")

        return Comm()


def run_ranks(size: int, fn: Any) -> list[Any]:
    """Run fn(rank) for every rank in its own thread; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=size) as pool:
        futures = [pool.submit(fn, rank) for rank in range(size)]
        return [f.result() for f in futures]


def tiny_model(seed: int = 0, **overrides: Any) -> tuple[TPLlama, CountingComm]:
    comm = CountingComm()
    cfg = dataclasses.replace(TINY, **overrides)
    return TPLlama(cfg, comm).init_random(seed), comm


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------
# Config


def test_presets_and_param_counts() -> None:
    for tp in (2, 3, 4):
        TINY.validate_tp(tp)
    assert TINY.head_dim == 8
    assert abs(PRESETS["small"].num_params - 100e6) < 5e6
    # Published sizes: Llama-3 8B = 8.03B, 70B = 70.55B parameters.
    assert round(PRESETS["llama3-8b"].num_params / 1e9, 2) == 8.03
    assert round(PRESETS["llama3-70b"].num_params / 1e9, 2) == 70.55
    assert get_config("llama3-8b", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="tiny"):
        get_config("nope")
    with pytest.raises(ValueError, match="num_layer"):
        get_config("tiny", num_layer=3)


def test_bad_tp_size() -> None:
    # Any TP size up to the head count is accepted, dividing or not.
    for tp in (5, 7, 24):
        TINY.validate_tp(tp)
    dataclasses.replace(TINY, num_kv_heads=6).validate_tp(4)  # KV groups span ranks
    dataclasses.replace(TINY, num_kv_heads=2).validate_tp(4)  # replicated KV heads
    dataclasses.replace(TINY, intermediate_size=390).validate_tp(4)  # 98 + 98 + 97 + 97
    with pytest.raises(ValueError, match="tp_size=25 is larger than num_heads=24"):
        TINY.validate_tp(25)
    with pytest.raises(ValueError, match="intermediate_size=3"):
        dataclasses.replace(TINY, intermediate_size=3).validate_tp(4)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            TINY.validate_tp(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_heads"):
        TPLlama(TINY, CountingComm(), tp_rank=0, tp_size=25)
    with pytest.raises(ValueError, match="tp_rank"):
        TPLlama(TINY, CountingComm(), tp_rank=2, tp_size=2)


@pytest.mark.parametrize("heads, kv", [(24, 12), (24, 2), (9, 3), (15, 5), (14, 2), (7, 7), (8, 1)])
def test_rank_layout_blocks(heads: int, kv: int) -> None:
    """Every TP size up to the head count: contiguous floor/ceil blocks covering every query
    head and MLP channel (the first n % p ranks the larger), and exactly the KV heads used."""
    cfg = ModelConfig(256, 64, 150, 1, heads, kv, head_dim=8)
    group = heads // kv
    for tp in range(1, heads + 1):
        layouts = [rank_layout(cfg, r, tp) for r in range(tp)]
        for n, kind in ((heads, "heads"), (150, "intermediate")):
            blocks = [getattr(lay, kind) for lay in layouts]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert [stop for _, stop in blocks[:-1]] == [start for start, _ in blocks[1:]]
            sizes = [stop - start for start, stop in blocks]
            assert sizes == [n // tp + (r < n % tp) for r in range(tp)]
        for lay in layouts:
            used = {q // group for q in range(*lay.heads)}
            assert set(range(*lay.kv_heads)) == used


_LEGACY_SHARDED = {  # param_shard before uneven splits, verbatim: the layout to keep
    "self_attn.q_proj.weight": (0, "heads"),
    "self_attn.k_proj.weight": (0, "kv_heads"),
    "self_attn.v_proj.weight": (0, "kv_heads"),
    "self_attn.o_proj.weight": (1, "heads"),
    "mlp.gate_proj.weight": (0, "intermediate"),
    "mlp.up_proj.weight": (0, "intermediate"),
    "mlp.down_proj.weight": (1, "intermediate"),
}


def _legacy_param_shard(name: str, cfg: ModelConfig, rank: int, tp: int) -> Any:
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    if suffix not in _LEGACY_SHARDED:
        return None
    dim, kind = _LEGACY_SHARDED[suffix]
    full = {
        "heads": cfg.num_heads * cfg.hd,
        "kv_heads": cfg.num_kv_heads * cfg.hd,
        "intermediate": cfg.intermediate_size,
    }[kind]
    if kind == "kv_heads" and tp > cfg.num_kv_heads:  # replicated KV heads
        head = rank // (tp // cfg.num_kv_heads)
        return dim, head * cfg.hd, (head + 1) * cfg.hd
    size = full // tp
    return dim, rank * size, (rank + 1) * size


@pytest.mark.parametrize("tp, kv", [(2, 12), (3, 12), (4, 12), (4, 2), (8, 2), (6, 3)])
def test_divisible_layout_unchanged(tp: int, kv: int) -> None:
    """The TP sizes commlab always ran keep their shards and SDPA's enable_gqa path."""
    cfg = dataclasses.replace(TINY, num_kv_heads=kv)
    for rank in range(tp):
        assert kv_runs(cfg, rank, tp) is None
        for name in full_param_shapes(cfg):
            assert param_shard(name, cfg, rank, tp) == _legacy_param_shard(name, cfg, rank, tp)


@pytest.mark.parametrize("tp, kv", [(5, 12), (4, 6), (7, 3)])
def test_init_random_uneven_slices_the_full_weights(tp: int, kv: int) -> None:
    """Uneven blocks and KV heads replicated across a group that spans ranks: every rank holds
    exactly its param_shard of the unsharded model's weights."""
    cfg = dataclasses.replace(TINY, num_kv_heads=kv)
    full = dict(TPLlama(cfg, CountingComm()).init_random(5).named_parameters())
    for rank in range(tp):
        for name, p in TPLlama(cfg, CountingComm(), rank, tp).init_random(5).named_parameters():
            assert torch.equal(p, slice_dim(full[name], param_shard(name, cfg, rank, tp))), name


# ----------------------------------------------------------------------------------------
# Communication pattern


@pytest.mark.parametrize("k", [1, 2, 3])
def test_all_reduce_count(k: int) -> None:
    model, comm = tiny_model()
    model.reset_cache(3, 16)
    model(torch.randint(0, 256, (3, 7)), micro_batches=k)  # prefill
    assert comm.calls == 2 * TINY.num_layers * k
    model(torch.randint(0, 256, (3, 1)), micro_batches=k)  # decode
    assert comm.calls == 2 * 2 * TINY.num_layers * k


def test_domino_schedule_order() -> None:
    """With 2 micro-batches the all-reduce of one micro-batch is always in flight while
    the other computes: handles are waited only when their result is needed."""
    model, comm = tiny_model()
    model.reset_cache(2, 8)
    model(torch.randint(0, 256, (2, 5)), micro_batches=2)
    # ids: layer L issues attn(mb0)=4L, attn(mb1)=4L+1, mlp(mb0)=4L+2, mlp(mb1)=4L+3
    expected = [
        ("issue", 0),
        ("issue", 1),
        ("wait", 0),
        ("issue", 2),
        ("wait", 1),
        ("issue", 3),
        ("wait", 2),
        ("issue", 4),
        ("wait", 3),
        ("issue", 5),
        ("wait", 4),
        ("issue", 6),
        ("wait", 5),
        ("issue", 7),
        ("wait", 6),
        ("wait", 7),
    ]
    assert comm.log == expected


# ----------------------------------------------------------------------------------------
# Numerics on one rank


def test_micro_batches_same_logits_and_tokens() -> None:
    model, _ = tiny_model()
    prompts = random_prompts([9, 5, 12, 7, 3])
    tokens, mask = left_pad(prompts, pad_id=0)
    ref = None
    for k in (1, 2, 3):
        model.reset_cache(len(prompts), 20)
        logits = model(tokens, mask, micro_batches=k)
        if ref is None:
            ref = logits
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    outs = [generate(model, prompts, 6, micro_batches=k).tokens for k in (1, 2, 3)]
    assert outs[0] == outs[1] == outs[2]


def test_kv_cache_decode_matches_full_recompute() -> None:
    model, _ = tiny_model()
    seq = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(3))
    model.reset_cache(2, 14)
    full = model(seq)  # (2, 14, V) without reuse of cached keys
    model.reset_cache(2, 14)
    steps = [model(seq[:, :9], micro_batches=2)]
    steps += [model(seq[:, i : i + 1], micro_batches=2) for i in range(9, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert model.cache_pos == 14
    with pytest.raises(ValueError, match="KV cache"):
        model(seq[:, :1])  # cache is full


def test_last_only_and_full_mask_forms() -> None:
    model, _ = tiny_model()
    prompts = random_prompts([6, 4])
    tokens, mask = left_pad(prompts, 0)
    model.reset_cache(2, 10)
    full = model(tokens, mask)
    nxt = torch.tensor([[5], [6]])
    step_a = model(nxt)
    model.reset_cache(2, 10)
    last = model(tokens, mask, last_only=True)
    torch.testing.assert_close(last, full[:, -1:])
    # HF-style mask covering everything so far must give the same decode logits.
    step_b = model(nxt, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1))
    torch.testing.assert_close(step_a, step_b)


def test_left_padding_matches_prompt_alone() -> None:
    model, _ = tiny_model()
    prompts = random_prompts([4, 11, 7])
    batched = generate(model, prompts, 8, micro_batches=2, return_logits=True)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 8, return_logits=True)
        assert batched.tokens[row] == alone.tokens[0]
        assert batched.logits is not None and alone.logits is not None
        for step in range(8):
            torch.testing.assert_close(
                batched.logits[step][row], alone.logits[step][0], rtol=1e-4, atol=1e-5
            )
        assert all(not torch.isnan(lg).any() for lg in batched.logits)


def test_sampling_is_seeded() -> None:
    model, _ = tiny_model()
    prompts = random_prompts([5, 8])
    a = generate(model, prompts, 10, temperature=1.0, top_k=20, seed=7).tokens
    b = generate(model, prompts, 10, temperature=1.0, top_k=20, seed=7).tokens
    c = generate(model, prompts, 10, temperature=1.0, top_k=20, seed=8).tokens
    assert a == b and a != c
    # top_k=1 leaves one candidate: sampling must collapse to greedy.
    assert (
        generate(model, prompts, 10, temperature=0.7, top_k=1).tokens
        == generate(model, prompts, 10).tokens
    )


def test_callbacks() -> None:
    model, _ = tiny_model()
    events: list[object] = []
    generate(
        model,
        random_prompts([3]),
        4,
        on_prefill_end=lambda: events.append("prefill"),
        on_step_end=events.append,
    )
    assert events == ["prefill", 1, 2, 3]


# ----------------------------------------------------------------------------------------
# Tensor parallelism


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_init_random_identical_for_any_tp(tp: int) -> None:
    full, _ = tiny_model(seed=5)
    full_sd = dict(full.named_parameters())
    shards = [
        dict(TPLlama(TINY, CountingComm(), r, tp).init_random(5).named_parameters())
        for r in range(tp)
    ]
    for name, ref in full_sd.items():
        shard = param_shard(name, TINY, 0, tp)
        if shard is None:
            for sd in shards:
                assert torch.equal(sd[name], ref)
        else:
            assert torch.equal(torch.cat([sd[name] for sd in shards], dim=shard[0]), ref)


@pytest.mark.parametrize(
    "tp, kv", [(2, 12), (3, 12), (4, 12), (4, 2), (6, 3), (8, 2), (5, 12), (4, 6), (7, 3)]
)
def test_threaded_tp_matches_single_rank(tp: int, kv: int) -> None:
    """Split KV heads (kv = 12) and replicated ones (tp a multiple of kv: 2 or 4 ranks per KV
    head), then TP sizes that divide neither the 24 heads nor the KV heads (uneven blocks,
    KV groups spanning ranks), against the unsharded model."""
    ref_model, _ = tiny_model(seed=2, num_kv_heads=kv)
    prompts = random_prompts([6, 9, 4])
    tokens, mask = left_pad(prompts, 0)
    ref_model.reset_cache(3, 12)
    ref_logits = ref_model(tokens, mask)
    ref_tokens = generate(ref_model, prompts, 5).tokens
    group = ThreadGroup(tp)

    def rank_fn(rank: int) -> tuple[Tensor, list[list[int]]]:
        cfg = dataclasses.replace(TINY, num_kv_heads=kv)
        model = TPLlama(cfg, group.comm(rank), rank, tp).init_random(2)
        model.reset_cache(3, 12)
        logits = model(tokens, mask, micro_batches=2)
        return logits, generate(model, prompts, 5, micro_batches=3).tokens

    for logits, toks in run_ranks(tp, rank_fn):
        # Sums over TP partials are reassociated, hence a tolerance, not equality.
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        assert toks == ref_tokens


def test_load_state_dict_full_slices_per_rank() -> None:
    full, _ = tiny_model(seed=4)
    state = {k: v.clone() for k, v in full.named_parameters()}
    other = TPLlama(TINY, CountingComm(), 1, 2).load_state_dict_full(state)
    ref = TPLlama(TINY, CountingComm(), 1, 2).init_random(4)
    for (name, a), (_, b) in zip(other.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        TPLlama(TINY, CountingComm()).load_state_dict_full(state)


# ----------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs() -> None:
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 120], 10)
    with pytest.raises(ValueError, match="micro_batches"):
        generate(model, [[1, 2], [3]], 2, micro_batches=3)
    model.reset_cache(2, 8)
    with pytest.raises(ValueError, match="micro_batches"):
        model(torch.ones(2, 3, dtype=torch.long), micro_batches=3)
    with pytest.raises(ValueError, match="reset_cache"):
        model(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, 999]], 2)
    with pytest.raises(RuntimeError, match="init_random"):
        TPLlama(TINY, CountingComm())(torch.ones(1, 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------
# Hugging Face checkpoints


HF_SHAPE = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """(hf_model, single-file dir, multi-shard dir) written by transformers itself."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**HF_SHAPE, rope_theta=10000.0)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    single = tmp_path_factory.mktemp("hf_single")
    sharded = tmp_path_factory.mktemp("hf_sharded")
    hf_model.save_pretrained(single, safe_serialization=True)
    hf_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (single / "model.safetensors.index.json").is_file()
    return hf_model, single, sharded


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_parity(hf_checkpoints: tuple[Any, Path, Path], layout: str) -> None:
    hf_model, single, sharded = hf_checkpoints
    path = single if layout == "single" else sharded
    model = load_hf_checkpoint(path, CountingComm())
    assert model.cfg == config_from_hf(path)
    prompts = random_prompts([7, 7])
    ids = torch.tensor(prompts)
    with torch.no_grad():
        hf_logits = hf_model(ids).logits
        hf_out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    model.reset_cache(2, 7)
    # float32 both sides; the only differences are summation order inside matmuls and
    # attention kernels (~1e-6 relative), so 1e-4 is loose but catches any real bug.
    torch.testing.assert_close(model(ids), hf_logits, rtol=1e-4, atol=1e-4)
    ours = generate(model, prompts, 8)
    assert ours.tokens == hf_out[:, 7:].tolist()


def test_hf_parity_left_padded(hf_checkpoints: tuple[Any, Path, Path]) -> None:
    hf_model, single, _ = hf_checkpoints
    model = load_hf_checkpoint(single, CountingComm())
    prompts = random_prompts([3, 8, 5], seed=9)
    ids, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        hf_out = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert generate(model, prompts, 8, micro_batches=2).tokens == hf_out[:, 8:].tolist()


def test_hf_tp2_shards(hf_checkpoints: tuple[Any, Path, Path]) -> None:
    hf_model, _, sharded = hf_checkpoints
    ranks = [load_hf_checkpoint(sharded, CountingComm(), r, 2) for r in range(2)]
    hd = 16
    for rank in ranks:
        attn, mlp = rank.model.layers[0].self_attn, rank.model.layers[0].mlp
        assert attn.q_proj.weight.shape == (2 * hd, 64)
        assert attn.k_proj.weight.shape == (1 * hd, 64)
        assert attn.v_proj.weight.shape == (1 * hd, 64)
        assert attn.o_proj.weight.shape == (64, 2 * hd)
        assert mlp.gate_proj.weight.shape == (64, 64)
        assert mlp.down_proj.weight.shape == (64, 64)
        assert rank.model.embed_tokens.weight.shape == (256, 64)
    hf_q = hf_model.model.layers[1].self_attn.q_proj.weight
    both = torch.cat([r.model.layers[1].self_attn.q_proj.weight for r in ranks])
    assert torch.equal(both, hf_q)
    hf_down = hf_model.model.layers[1].mlp.down_proj.weight
    both = torch.cat([r.model.layers[1].mlp.down_proj.weight for r in ranks], dim=1)
    assert torch.equal(both, hf_down)

    # And the two shards, run together, reproduce HF's logits.
    ids = torch.tensor(random_prompts([6, 6]))
    with torch.no_grad():
        hf_logits = hf_model(ids).logits
    group = ThreadGroup(2)

    def rank_fn(r: int) -> Tensor:
        model = load_hf_checkpoint(sharded, group.comm(r), r, 2)
        model.reset_cache(2, 6)
        return model(ids, micro_batches=2)

    for logits in run_ranks(2, rank_fn):
        torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=1e-4)


def test_hf_num_layers_truncation(hf_checkpoints: tuple[Any, Path, Path]) -> None:
    _, single, _ = hf_checkpoints
    model = load_hf_checkpoint(single, CountingComm(), num_layers=1)
    assert model.cfg.num_layers == 1 and len(model.model.layers) == 1
    with pytest.raises(ValueError, match="num_layers"):
        load_hf_checkpoint(single, CountingComm(), num_layers=3)


def test_checkpoint_errors(tmp_path: Path, hf_checkpoints: tuple[Any, Path, Path]) -> None:
    _, single, sharded = hf_checkpoints
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "missing", CountingComm())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_checkpoint(empty, CountingComm())

    def copy_of(src: Path, name: str) -> Path:
        dst = tmp_path / name
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    no_weights = copy_of(single, "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_hf_checkpoint(no_weights, CountingComm())

    corrupt = copy_of(single, "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_hf_checkpoint(corrupt, CountingComm())

    lost_shard = copy_of(sharded, "lost_shard")
    index = json.loads((lost_shard / "model.safetensors.index.json").read_text())
    first = min(index["weight_map"].values())
    (lost_shard / first).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(first)):
        load_hf_checkpoint(lost_shard, CountingComm())

    no_tensor = copy_of(sharded, "no_tensor")
    index = json.loads((no_tensor / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (no_tensor / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_hf_checkpoint(no_tensor, CountingComm())

    wrong_shape = copy_of(single, "wrong_shape")
    cfg = json.loads((wrong_shape / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_hf_checkpoint(wrong_shape, CountingComm())


def test_config_from_hf_rejects_unsupported(tmp_path: Path) -> None:
    cfg = {
        **HF_SHAPE,
        "model_type": "llama",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama3"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_hf(tmp_path)


def test_full_param_shapes_match_module() -> None:
    for tied in (False, True):
        cfg: ModelConfig = dataclasses.replace(TINY, tie_word_embeddings=tied)
        model = TPLlama(cfg, CountingComm())
        names = [n for n, _ in model.named_parameters()]
        assert names == list(full_param_shapes(cfg))
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params


def test_comm_may_update_inputs_in_place_from_another_thread() -> None:
    """Strategies may write into the tensor they were given from a progress thread (or
    after forward returns); the model must hand over ordinary (non-inference) tensors."""
    pool = ThreadPoolExecutor(max_workers=1)

    class Future:
        def __init__(self, x: Tensor) -> None:
            self.future = pool.submit(lambda: x.mul_(1.0))  # in-place, other thread

        def wait(self) -> Tensor:
            return self.future.result()

    class ThreadedComm(FusedFromCollectives):
        def all_reduce(self, x: Tensor) -> Future:
            return Future(x)

    ref, _ = tiny_model()
    model = TPLlama(TINY, ThreadedComm()).init_random(0)
    tokens = torch.randint(0, 256, (2, 5))
    ref.reset_cache(2, 5)
    model.reset_cache(2, 5)
    torch.testing.assert_close(model(tokens, micro_batches=2), ref(tokens))
    pool.shutdown()


class _Stats:
    calls = collectives = bytes = wire_bytes = 0
    wait_s = 0.0


@pytest.mark.parametrize("tp", [1, 2])
def test_static_decode_step_matches_dynamic(tp: int) -> None:
    """The fixed-shape decode step a CUDA graph captures (whole cache, position read from a
    device tensor) gives the dynamic path's logits and tokens, with left padding and
    micro-batches, at TP 1 and 2."""
    from framework.run.graphs import GraphDecode

    prompts = random_prompts([7, 3, 5])
    group = ThreadGroup(tp)

    def rank_fn(rank: int) -> tuple[Any, Any]:
        comm = group.comm(rank)
        model = TPLlama(TINY, comm, rank, tp).init_random(5)
        dynamic = generate(model, prompts, 8, micro_batches=2, return_logits=True)
        comm.stats = _Stats()
        step = GraphDecode(model, comm, micro_batches=2, capture=False)
        static = generate(model, prompts, 8, micro_batches=2, return_logits=True, decode_step=step)
        return dynamic, static

    for dynamic, static in run_ranks(tp, rank_fn):
        assert static.tokens == dynamic.tokens
        for a, b in zip(static.logits, dynamic.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reset_cache_of_the_same_shape_zeroes_in_place() -> None:
    """A captured CUDA graph reads the cache by address: a second generation of the same
    shape must reuse the tensors (zeroed), not allocate new ones."""
    model, _ = tiny_model()
    model.reset_cache(2, 10)
    k0, mask0 = model._k_cache[0], model._mask
    model(torch.ones(2, 3, dtype=torch.long))
    model.reset_cache(2, 10)
    assert model._k_cache[0] is k0 and model._mask is mask0 and model.cache_pos == 0
    assert not k0.any() and not mask0.any()
    model.reset_cache(2, 11)
    assert model._k_cache[0] is not k0


@pytest.mark.parametrize("tp, micro_batches", [(2, 1), (3, 2), (4, 1), (4, 3)])
def test_sequence_parallel_matches_single_rank(tp: int, micro_batches: int) -> None:
    """Reduce-scatter over tokens, norms on the token shard, all-gather before each
    column-parallel projection: the unsharded model's tokens, logits within the TP
    tolerance, padded token counts (5 prompts of 7 tokens do not divide by 2, 3 or 4), and
    below sp_min_tokens the decode steps all-reduce."""
    ref_model, _ = tiny_model(seed=2)
    prompts = random_prompts([7, 5, 7, 3, 6])
    ref = generate(ref_model, prompts, 4, return_logits=True)
    group = ThreadGroup(tp)

    def rank_fn(rank: int) -> tuple[Any, Any, TPLlama]:
        comm = group.comm(rank)
        model = TPLlama(TINY, comm, rank, tp).init_random(2)
        model.set_sequence_parallel(True, min_tokens=6)  # prefill (35 tokens) only
        out = generate(model, prompts, 4, micro_batches=micro_batches, return_logits=True)
        return out, comm.ops, model

    for out, ops, model in run_ranks(tp, rank_fn):
        assert out.tokens == ref.tokens
        for a, b in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        layers = TINY.num_layers
        prefill = ops[: micro_batches * (4 * layers + 1)]
        assert prefill.count("reduce_scatter") == 2 * layers * micro_batches
        assert prefill.count("all_gather") == (2 * layers + 1) * micro_batches
        assert set(ops[len(prefill) :]) == {"all_reduce"}  # 5 tokens per decode step < 6
        assert model.sp_steps == 1
        bounds = [
            (e - s) * 7
            for s, e in __import__("framework.model.layers", fromlist=["x"]).split_batch(
                5, micro_batches
            )
        ]
        assert model.sp_padded_tokens == sum(-n % tp for n in bounds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_norm_is_the_model_norm(dtype: torch.dtype) -> None:
    """The communicator's composed epilogue and the model's RMSNorm round alike: the fused
    op gives the bits the model always had (the model may not import the comm core)."""
    from framework.comm.fused import rms_norm
    from framework.model.layers import RMSNorm

    norm = RMSNorm(64, 1e-6, dtype)
    norm.weight.data = torch.randn(64).to(dtype)
    x = (torch.randn(5, 3, 64) * 7).to(dtype)
    assert torch.equal(norm(x), rms_norm(x, norm.weight, 1e-6))
