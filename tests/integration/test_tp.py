"""Tensor-parallel inference is exact: TP 2, 3 and 4 against TP 1, for every strategy, and at
TP sizes that do not divide the head count (SmolLM2-135M's 9 heads / 3 KV heads at TP 2 and 4).

Tolerance: TP splits each row-parallel matmul's reduction over heads / intermediate channels
into per-rank partial sums that are then added by the all-reduce, so float32 results differ
from the unsharded model only by summation order: about 1e-7 relative per op, a few 1e-6 on
the tiny model's logits (|logit| < 1) after 2 layers. atol 1e-5 leaves margin while any real
sharding or communication bug (a missing or doubled partial sum) moves logits by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import FULL, first_only

from framework import available_strategies, build_communicator, get_strategy
from framework.model import ModelConfig, TPLlama, get_config
from framework.model.generate import generate
from framework.model.sharding import rank_layout

PROMPTS = [[5, 17, 42, 9, 3, 77], [8, 1, 250], [100, 101, 102, 103], [7, 7, 7, 7, 7]]
# exact strategies: within float rounding of TP 1 (quantized: tests/integration/test_quantized.py)
STRATEGIES = [n for n in available_strategies() if get_strategy(n).exact]
TIER = {("naive", 2), ("shm", 3), ("bucketed", 4)}


def tp_generate(
    strategy: str, options: dict, micro_batches: int, new_tokens: int = 4, sp: bool = False
):
    """On a rank: build the tiny model's shard, generate greedily; return tokens and logits."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = build_communicator(strategy, **options)
    try:
        model = TPLlama(get_config("tiny"), comm, rank, world).init_random(seed=3)
        model.set_sequence_parallel(sp)
        out = generate(model, PROMPTS, new_tokens, micro_batches=micro_batches, return_logits=True)
        calls, collectives = comm.stats.calls, comm.stats.collectives
    finally:
        comm.close()
    return out.tokens, torch.stack(out.logits), calls, collectives


@pytest.fixture(scope="module")
def reference(pools):
    tokens, logits, _, _ = pools(1).run(tp_generate, "naive", {}, 1)[0]
    return tokens, logits


@pytest.mark.parametrize(
    "strategy, world_size",
    [  # the README tier: the baseline, a reordering transport, a schedule (the kit holds
        # every strategy to the exact sums at world size 2 or 3)
        pytest.param(s, p, marks=() if (s, p) in TIER else (FULL,))
        for s in STRATEGIES
        for p in (2, 3, 4)
    ],
)
def test_tp_matches_unsharded(pools, reference, strategy: str, world_size: int) -> None:
    ref_tokens, ref_logits = reference
    outs = pools(world_size).run(tp_generate, strategy, {}, 2)
    cfg = get_config("tiny")
    for rank, (tokens, logits, calls, _) in enumerate(outs):
        assert tokens == ref_tokens, f"rank {rank} greedy tokens differ"
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        # prefill + 3 decode forwards, 2 all-reduces per layer per micro-batch
        assert calls == 4 * 2 * cfg.num_layers * 2


def test_schedule_over_tree_in_tp(pools, reference) -> None:
    outs = pools(4).run(tp_generate, "double_buffer", {"inner": "tree"}, 3)
    assert outs[0][0] == reference[0]
    torch.testing.assert_close(outs[0][1], reference[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
def test_fusion_only_with_independent_work(pools, micro_batches: int) -> None:
    """bucketed fuses the k micro-batches' all-reduces of a block; with k=1 there is nothing."""
    _, _, calls, collectives = pools(2).run(tp_generate, "bucketed", {}, micro_batches)[0]
    assert calls == 4 * 2 * 2 * micro_batches
    assert collectives == calls // micro_batches


def hf_tp_generate(path: str, prompt: list[int], new_tokens: int) -> tuple[list[int], int]:
    """Tokens, and the K projection rows this rank loaded (its KV heads x head_dim)."""
    from framework.model.checkpoint import load_hf_checkpoint

    comm = build_communicator("bucketed")
    try:
        model = load_hf_checkpoint(path, comm, dist.get_rank(), dist.get_world_size())
        k_rows = model.model.layers[0].self_attn.k_proj.weight.shape[0]
        return generate(model, [prompt], new_tokens).tokens[0], k_rows
    finally:
        comm.close()


@pytest.mark.parametrize("heads, kv, tp", [(4, 2, 2), (4, 2, 4), (9, 3, 2)])
def test_hf_checkpoint_matches_transformers(pools, tmp_path, heads: int, kv: int, tp: int) -> None:
    """4 heads on 2 KV heads: split at TP 2, each replicated on 2 ranks at TP 4 (as vLLM does).
    9 heads on 3 KV heads (SmolLM2-135M's) at TP 2: 5 + 4 heads, the middle KV head on both."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=16 * heads,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    outs = pools(tp).run(hf_tp_generate, str(tmp_path), prompt, 8)
    assert [tokens for tokens, _ in outs] == [want] * tp
    ours = ModelConfig(256, cfg.hidden_size, 128, 2, heads, kv)
    kv_rows = [16 * rank_layout(ours, r, tp).num_kv_heads for r in range(tp)]
    assert [rows for _, rows in outs] == kv_rows


def _sp_every_strategy() -> list[tuple[str, int, list, torch.Tensor, int, int]]:
    """Sequence parallelism in every forward (prefill and decode: 4 sequences pad to a
    multiple of 3), every strategy, with and without micro-batches, on one set of ranks."""
    out = []
    for strategy in STRATEGIES:
        for mb in (1, 2):
            tokens, logits, calls, collectives = tp_generate(strategy, {}, mb, sp=True)
            out.append((strategy, mb, tokens, logits, calls, collectives))
    return out


@pytest.mark.parametrize("world_size", first_only([3, 2, 4]))
def test_sequence_parallel_matches_unsharded(pools, reference, world_size: int) -> None:
    ref_tokens, ref_logits = reference
    layers = get_config("tiny").num_layers
    for rank_out in pools(world_size).run(_sp_every_strategy, timeout_s=300):
        for strategy, mb, tokens, logits, calls, _ in rank_out:
            what = f"{strategy}, {mb} micro-batches"
            assert tokens == ref_tokens, what
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0, msg=what)
            # per forward and micro-batch: 2 reduce-scatters and 2 all-gathers per layer,
            # and the all-gather before the head; 4 forwards
            assert calls == 4 * mb * (4 * layers + 1), what


# Chunked and token-split schedules with their gates open, so the tiny prompts exercise them:
# (strategy, options, sequence parallel)
FUSED_SCHEDULES = [
    ("overlap", {"min_tokens": 0}, True),
    ("overlap", {"min_tokens": 0, "chunks": 3, "inner": "shm"}, True),
    ("token_split", {"min_tokens": 0}, False),
    ("token_split", {"min_tokens": 0, "inner": "shm"}, True),
    ("shm", {}, True),
    ("shm", {"fuse_epilogue": True}, False),
]


def _fused_schedules() -> list[tuple[str, int, list, torch.Tensor, int, int, dict]]:
    out = []
    for strategy, options, sp in FUSED_SCHEDULES:
        for mb in (1, 2):
            tokens, logits, calls, collectives = tp_generate(strategy, options, mb, sp=sp)
            out.append((f"{strategy} {options} sp={sp}", mb, tokens, logits, calls, collectives))
    return out


@pytest.mark.parametrize("world_size", first_only([3, 2, 4]))
def test_fused_and_overlapped_ops_match_unsharded(pools, reference, world_size: int) -> None:
    """The fused ops as the model calls them, chunked (overlap), multiplied on arrival (shm)
    and with each micro-batch's tokens cut in two (token_split): the unsharded model's tokens,
    logits within 1e-5. Chunking shows in the count: more collectives than calls."""
    ref_tokens, ref_logits = reference
    for rank_out in pools(world_size).run(_fused_schedules, timeout_s=300):
        for what, mb, tokens, logits, calls, collectives in rank_out:
            what = f"{what}, {mb} micro-batches"
            assert tokens == ref_tokens, what
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0, msg=what)
            if what.startswith("overlap"):
                assert collectives > calls, what
            if what.startswith("token_split"):  # prefill cut in two: 2 more units per mb
                layers = get_config("tiny").num_layers
                per_unit = 4 * layers + 1 if "sp=True" in what else 2 * layers
                assert calls == mb * per_unit * 4 + mb * per_unit, what


# (query heads, KV heads, TP): uneven head blocks (5 + 4, 3 + 2 + 2 + 2, 8 + 7, 4 + 4 + 3 + 3)
# and KV heads replicated where a query group spans ranks; 151 MLP channels never split evenly.
UNEVEN = [(9, 3, 2), (9, 3, 4), (15, 5, 2), (14, 2, 4)]


def uneven_generate(cases: list[tuple[int, int]]) -> list[tuple[list, torch.Tensor, int, int]]:
    """On a rank: for each (heads, KV heads), greedy tokens, logits, collectives and
    sequence-parallel forwards, without then with sequence parallelism."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for heads, kv in cases:
        cfg = ModelConfig(256, 64, 151, 2, heads, kv, head_dim=8, max_seq_len=64)
        for sp in (False, True):
            comm = build_communicator("naive")
            try:
                model = TPLlama(cfg, comm, rank, world).init_random(seed=3)
                model.set_sequence_parallel(sp)
                gen = generate(model, PROMPTS, 4, micro_batches=2, return_logits=True)
                out.append((gen.tokens, torch.stack(gen.logits), comm.stats.calls, model.sp_steps))
            finally:
                comm.close()
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_not_dividing_the_heads_matches_unsharded(pools, world_size: int) -> None:
    cases = [(h, kv) for h, kv, tp in UNEVEN if tp == world_size]
    ref = pools(1).run(uneven_generate, cases)[0]
    for rank_out in pools(world_size).run(uneven_generate, cases):
        for i, (tokens, logits, calls, sp_steps) in enumerate(rank_out):
            sp = i % 2 == 1
            what = f"heads, kv = {cases[i // 2]}, sequence parallel {sp}"
            assert tokens == ref[i][0], what
            torch.testing.assert_close(logits, ref[i][1], atol=1e-5, rtol=0, msg=what)
            # 4 forwards of 2 micro-batches, 2 layers: 2 all-reduces per layer, or 2
            # reduce-scatters and 2 all-gathers per layer plus 1 before the head
            assert (calls, sp_steps) == ((4 * 2 * 9, 4) if sp else (4 * 2 * 4, 0)), what
