"""Batched autoregressive generation on one TPLlama rank.

Every TP rank calls ``generate`` with the same arguments. Logits are replicated
(identical all-reduce results feed a replicated norm + lm_head), and sampling uses a
generator seeded identically on every rank, so all ranks pick the same tokens without
any extra communication.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from framework.model.llama import TPLlama


@dataclass
class GenerateOutput:
    """``tokens[b]``: the ``new_tokens`` ids generated for prompt b (prompt excluded).
    ``logits`` (only with return_logits=True): ``new_tokens`` float32 tensors of shape
    (batch, vocab); ``logits[0]`` is the prefill's last position (it chose token 0),
    ``logits[i]`` the decode step that chose token i."""

    tokens: list[list[int]]
    logits: list[Tensor] | None = None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(tokens, mask), both (B, max_len) long; pads on the left so that every row's last
    prompt token sits in the same column and decode steps stay aligned."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return tokens, mask


def _is_token_id(tok: object, vocab_size: int) -> bool:
    """An integer (any integer type, not a bool: a float would be truncated) in the vocabulary."""
    if isinstance(tok, bool):
        return False
    try:
        return 0 <= operator.index(tok) < vocab_size
    except TypeError:
        return False


def _select(logits: Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> Tensor:
    """Next token per row from float32 logits (B, V) -> (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature  # (B, V)
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # (B,)


@torch.no_grad()  # not inference_mode: see TPLlama.forward
def generate(
    model: TPLlama,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    micro_batches: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    pad_id: int = 0,
    return_logits: bool = False,
    on_prefill_end: Callable[[], None] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    decode_step: Callable[[Tensor], Tensor] | None = None,
    cache_len: int | None = None,
    teacher: list[list[int]] | None = None,
) -> GenerateOutput:
    """Generate ``new_tokens`` tokens for each prompt (greedy when temperature == 0).

    Runs one prefill forward (which yields token 0) and ``new_tokens - 1`` decode
    forwards. ``on_prefill_end()`` fires after token 0 is chosen; ``on_step_end(i)``
    after decode step i (1 <= i < new_tokens) chose token i. The callbacks do not
    synchronise an accelerator: a timing callback should do so itself.
    ``decode_step(tokens)`` replaces the decode forward (tokens (B, 1) -> logits (B, 1, V),
    advancing the cache): a CUDA-graph replay, say (``framework.run.graphs``).
    The model's KV cache is reset to exactly max prompt length + new_tokens positions, or to
    ``cache_len`` (a warm-up that must leave the cache shaped as the measured run's).
    ``teacher[b]`` (``new_tokens`` ids per prompt): teacher forcing, each decode step is fed
    the teacher's token instead of the one chosen, so two runs see the same inputs and their
    logits can be compared step by step (``tokens`` still holds the chosen ids).
    """
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    for row, prompt in enumerate(prompts):
        bad = [tok for tok in prompt if not _is_token_id(tok, cfg.vocab_size)]
        if bad:
            raise ValueError(
                f"prompt {row} holds {bad[:5]}; token ids are integers in [0, {cfg.vocab_size})"
            )
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id={pad_id} outside [0, {cfg.vocab_size})")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = disabled), got {top_k}")
    prompt_len = max(len(p) for p in prompts)
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + new_tokens {new_tokens} exceeds the "
            f"model context max_seq_len={cfg.max_seq_len}"
        )
    if micro_batches > len(prompts):
        raise ValueError(f"micro_batches={micro_batches} exceeds batch size {len(prompts)}")
    if teacher is not None and (
        len(teacher) != len(prompts) or any(len(t) < new_tokens for t in teacher)
    ):
        raise ValueError("teacher needs new_tokens ids for every prompt")

    tokens, mask = left_pad(prompts, pad_id)  # (B, P) each
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    gen = None
    if temperature > 0.0:
        # Same seed on every rank -> same draws from identical logits -> same tokens.
        gen = torch.Generator(device=model.device).manual_seed(seed)

    need = prompt_len + new_tokens
    if cache_len is not None and cache_len < need:
        raise ValueError(f"cache_len={cache_len} is shorter than prompt + new tokens ({need})")
    model.reset_cache(len(prompts), max_len=cache_len or need)
    chosen: list[Tensor] = []
    kept: list[Tensor] = []
    fed = None if teacher is None else torch.tensor(teacher, device=model.device)  # (B, N)
    logits = model(tokens, mask, micro_batches=micro_batches, last_only=True)  # (B, 1, V)
    for step in range(new_tokens):
        last_tok = None
        if step > 0:
            last_tok = (chosen[-1] if fed is None else fed[:, step - 1])[:, None]  # (B, 1)
        if step > 0 and decode_step is not None:
            logits = decode_step(last_tok)  # (B, 1, V)
        elif step > 0:
            logits = model(last_tok, micro_batches=micro_batches, last_only=True)  # (B, 1, V)
        last = logits[:, -1].float()  # (B, V)
        chosen.append(_select(last, temperature, top_k, gen))  # (B,)
        if return_logits:
            kept.append(last)
        if step == 0:
            if on_prefill_end is not None:
                on_prefill_end()
        elif on_step_end is not None:
            on_step_end(step)

    out = torch.stack(chosen, dim=1).tolist()  # (B, new_tokens)
    return GenerateOutput(tokens=out, logits=kept if return_logits else None)
