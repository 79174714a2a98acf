"""What a strategy's arithmetic did to the model's output, against exact communication.

With ``workload.reference=exact`` the runner decodes the same prompts a second time, in the
same job on the same ranks and weights, with the library's exact all-reduce (``naive``), and
then once more with the strategy under test, teacher-forced on the exact run's tokens: both
runs see the same inputs at every step, so their next-token distributions can be compared
step by step without one divergent token snowballing. :func:`compare` turns those logits and
the free-running tokens into the ``numerics`` block of ``results.json``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def first_divergence(tokens: list[list[int]], exact: list[list[int]]) -> list[int | None]:
    """Per sequence, the first step where free-running ``tokens`` differ from ``exact``
    (None: never within the run)."""
    out: list[int | None] = []
    for mine, ref in zip(tokens, exact, strict=True):
        out.append(next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), None))
    return out


def compare(
    logits: list[Tensor],
    exact_logits: list[Tensor],
    forced_tokens: list[list[int]],
    exact_tokens: list[list[int]],
    tokens: list[list[int]],
    wire_bytes: int,
    exact_wire_bytes: int,
) -> dict[str, Any]:
    """The ``numerics`` block. ``logits[i]`` / ``exact_logits[i]`` (batch, vocab): step i of
    the teacher-forced strategy run and of the exact run; ``forced_tokens`` and
    ``exact_tokens`` their choices (greedy, or sampled with the same temperature, top-k and
    seed: the same draws from the same logits give the same tokens); ``tokens`` the
    strategy's own free-running tokens (the measured run).

    * ``agreement``: share of (sequence, step) where the strategy's teacher-forced choice
      equals the exact run's token;
    * ``first_divergence``: the earliest step at which any free-running sequence left the
      exact one (None: none did), with ``diverged_sequences``;
    * ``logit_max_abs_err`` / ``logit_mean_abs_err`` over every step, sequence and entry;
    * ``kl_mean``: mean over (sequence, step) of KL(exact || strategy) of the next-token
      distributions (softmax of the logits), in nats;
    * ``wire_bytes_vs_exact``: bytes this rank sent in the teacher-forced run over the bytes
      the exact strategy sent for the same tokens."""
    got = torch.stack([x.float() for x in logits])  # (N, B, V)
    ref = torch.stack([x.float() for x in exact_logits])  # (N, B, V)
    want = torch.tensor(exact_tokens).T  # (N, B)
    chose = torch.tensor(forced_tokens).T  # (N, B)
    err = (got - ref).abs()
    logp_ref = torch.log_softmax(ref.double(), dim=-1)
    logp = torch.log_softmax(got.double(), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)  # (N, B)
    div = first_divergence(tokens, exact_tokens)
    hit = [d for d in div if d is not None]
    return {
        "reference": "naive",
        "steps": got.shape[0],
        "agreement": float((chose == want).double().mean()),
        "first_divergence": min(hit) if hit else None,
        "diverged_sequences": len(hit),
        "logit_max_abs_err": float(err.max()),
        "logit_mean_abs_err": float(err.double().mean()),
        "kl_mean": float(kl.clamp_min(0).mean()),
        "wire_bytes": wire_bytes,
        "exact_wire_bytes": exact_wire_bytes,
        "wire_bytes_vs_exact": wire_bytes / exact_wire_bytes if exact_wire_bytes else None,
    }
