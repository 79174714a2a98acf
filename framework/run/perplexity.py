"""Perplexity on a fixed evaluation text: what a strategy's arithmetic costs a trained model.

With ``workload.reference=exact`` and ``workload.eval_text`` set, the runner scores the same
text teacher-forced twice on the same ranks and weights, once with exact communication and
once with the strategy under test, and the ``numerics`` block gains ``perplexity``: both
perplexities, their ratio with a block-bootstrap interval (neighbouring tokens are correlated,
so whole blocks are resampled), the mean KL per token and top-1 agreement on the text.

The text must be there offline and the same every time: ``python-docs`` is the standard
library's own documentation (``pydoc_data.topics``, the text ``help()`` shows: every topic in
name order). Its SHA-256 goes into ``results.json`` with its name: another Python release
ships other words, and the hash says so.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _python_docs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


EVAL_TEXTS: dict[str, Callable[[], str]] = {"python-docs": _python_docs}


def eval_text(name: str) -> tuple[str, str]:
    """The text called ``name`` and its SHA-256."""
    if name not in EVAL_TEXTS:
        raise ValueError(f"unknown evaluation text {name!r}; available: {sorted(EVAL_TEXTS)}")
    text = EVAL_TEXTS[name]()
    return text, hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def score(
    model: Any, ids: list[int], chunk: int, reference: list[Tensor] | None, keep: bool
) -> dict[str, Any]:
    """Teacher-forced pass over ``ids`` in chunks of ``chunk`` tokens (the KV cache carries
    the context across chunks). Per predicted token: its negative log-likelihood; against
    ``reference`` (the exact run's log-probabilities, chunk by chunk) also KL(exact || this)
    and whether the top-1 choices agree. ``keep``: return this run's log-probabilities (the
    exact run on the rank that compares)."""
    n = len(ids) - 1
    model.reset_cache(1, n)
    nll, kl, agree, kept = [], [], [], []
    for i, start in enumerate(range(0, n, chunk)):
        x = torch.tensor([ids[start : min(start + chunk, n)]])
        logp = F.log_softmax(model(x)[0].double(), dim=-1).cpu()  # (t, V), on the host
        target = torch.tensor(ids[start + 1 : start + 1 + x.shape[1]])
        nll.append(-logp.gather(1, target[:, None])[:, 0])
        if reference is not None:
            ref = reference[i]
            kl.append((ref.exp() * (ref - logp)).sum(-1).clamp_min(0))
            agree.append(ref.argmax(-1) == logp.argmax(-1))
        if keep:
            kept.append(logp)
    out: dict[str, Any] = {"nll": torch.cat(nll), "logp": kept}
    if reference is not None:
        out["kl"], out["agree"] = torch.cat(kl), torch.cat(agree)
    return out


def ratio_interval(
    nll: Tensor, exact_nll: Tensor, block: int = 64, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Perplexity ratio (this / exact) and its 95% interval: the per-token differences of
    log-likelihood resampled in whole blocks of ``block`` tokens (a fixed generator: the same
    numbers every time; a text under 16 blocks is cut into 16 smaller ones; tokens past the
    last whole block count in the ratio, not in the resampling; fewer than two blocks: no
    interval, NaN)."""
    d = (nll - exact_nll).double().cpu()
    ratio = math.exp(float(d.mean()))
    block = max(1, min(block, len(d) // 16))  # a short text: 16 smaller blocks
    blocks = d[: len(d) // block * block].view(-1, block).mean(1)  # a partial tail block: out
    if len(blocks) < 2:  # no interval from fewer than two blocks: say so, not lo = hi
        return ratio, math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(blocks), (resamples, len(blocks)), generator=g)
    means = blocks[pick].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return ratio, math.exp(lo), math.exp(hi)


def perplexity_block(
    name: str, digest: str, run: dict[str, Any], exact: dict[str, Any]
) -> dict[str, Any]:
    ratio, lo, hi = ratio_interval(run["nll"], exact["nll"])
    return {
        "text": name,
        "sha256": digest,
        "tokens": len(run["nll"]),
        "exact": math.exp(float(exact["nll"].mean())),
        "strategy": math.exp(float(run["nll"].mean())),
        "ratio": ratio,  # perplexity / exact perplexity
        "ratio_lo": lo,
        "ratio_hi": hi,
        "kl_per_token": float(run["kl"].mean()),
        "top1_agreement": float(run["agree"].double().mean()),
    }
