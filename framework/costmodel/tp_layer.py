"""A Llama decoder layer under tensor parallelism, timed under each schedule of :mod:`.overlap`.

Per GPU of ``p``: the attention block (QKV matmul, attention, row-parallel output projection)
and the MLP block (gate/up matmul, SiLU x up, row-parallel down projection), each followed by
an all-reduce of ``tokens x hidden`` values and the residual add + RMSNorm. Every compute
kernel costs its roofline plus ``kernel_s``. Attention is causal over the tokens themselves
(prefill, ``prior`` tokens before them) or, with ``context``, decode: every token a sequence
reading ``context`` cached keys and values. The all-reduce is the fastest the serving stacks
have at that size: their custom one- or two-shot kernel inside a node, or the library (vLLM
sends a reduction of 8 MiB or more to the library whatever it costs; a gate like that would
make chunks faster than the whole message for a reason that is not overlap).

Schedules (seconds per layer): ``composed``; ``chunked`` (each row-parallel matmul and its
all-reduce in ``c`` chunks); ``async_tp`` (sequence parallel: all-gather -> QKV and gate/up,
output and down projections -> reduce-scatter, each pair chunked, norms on 1/p of the
tokens); ``token_split`` (two halves of the tokens); ``fused`` (composed with the epilogue
fused into the all-reduce). The LM head, embedding and sampling are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from framework.costmodel.formulas import allreduce_time, collective_time, library_time
from framework.costmodel.overlap import (
    chunked_time,
    epilogue_time,
    matmul_time,
    roofline_time,
    token_split_time,
)
from framework.costmodel.topology import Topology

ROW_PARALLEL = ("o_proj", "down")


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2


def layer_compute(
    topo: Topology, s: LayerShape, tokens: int, p: int, *, prior: int = 0, context: int = 0
) -> dict[str, float]:
    """Roofline seconds of each compute kernel of one layer on one GPU (no ``kernel_s``)."""
    b, d = s.dtype_bytes, s.head_dim
    q, kv = s.heads // p * d, max(1, s.kv_heads // p) * d
    keys = tokens * context if context else tokens * prior + tokens * tokens / 2
    kv_rows = tokens * context if context else tokens + prior
    inter = s.intermediate // p
    return {
        "qkv": matmul_time(topo, tokens, s.hidden, q + 2 * kv, b),
        "attention": roofline_time(topo, 4.0 * keys * q, (2 * tokens * q + 2 * kv_rows * kv) * b),
        "o_proj": matmul_time(topo, tokens, q, s.hidden, b),
        "gate_up": matmul_time(topo, tokens, s.hidden, 2 * inter, b),
        "act": roofline_time(topo, 0.0, 3 * tokens * inter * b),
        "down": matmul_time(topo, tokens, inter, s.hidden, b),
    }


def tp_algorithm(topo: Topology, p: int, n: float) -> str:
    """The all-reduce a TP reduction of ``n`` bytes runs: the fastest of the custom kernels
    (one node only: peer memory) and the library (``naive``: costed as NCCL runs it)."""
    custom = topo.custom_ar is not None and p <= topo.ranks_per_node
    names = ("oneshot", "twoshot", "naive") if custom else ("naive",)
    return min(names, key=lambda a: _allreduce(topo, a, p, n))


def tp_allreduce_time(topo: Topology, p: int, n: float) -> float:
    return _allreduce(topo, tp_algorithm(topo, p, n), p, n)


def _allreduce(topo: Topology, algorithm: str, p: int, n: float) -> float:
    return (
        library_time(topo, p, n) if algorithm == "naive" else allreduce_time(topo, algorithm, p, n)
    )


def schedules(
    topo: Topology,
    s: LayerShape,
    tokens: int,
    p: int,
    *,
    context: int = 0,
    chunks: tuple[int, ...] = (2, 4, 8),
) -> dict[str, float]:
    """Seconds of one layer under every schedule (``chunked_<c>`` for each chunk count)."""
    ks, share = topo.kernel_s, topo.comm_sm_share
    n = tokens * s.hidden * s.dtype_bytes
    c = layer_compute(topo, s, tokens, p, context=context)

    def ar(nbytes: float) -> float:
        return tp_allreduce_time(topo, p, nbytes)

    compute = sum(c.values()) + len(c) * ks
    epi = epilogue_time(topo, n, fused=False)
    out = {
        "composed": compute + 2 * (ar(n) + epi),
        "fused": compute + 2 * (ar(n) + epilogue_time(topo, n, fused=True)),
    }
    rest = compute - sum(c[k] for k in ROW_PARALLEL)
    for k in chunks:
        pairs = sum(chunked_time(c[m], ar, n, k, ks, share) for m in ROW_PARALLEL)
        out[f"chunked_{k}"] = rest + pairs + 2 * epi
    out["async_tp"] = min(_async_tp(topo, c, n, p, k) for k in chunks)
    out["token_split"] = _token_split(topo, s, tokens, p, context, ar)
    return out


def _async_tp(topo: Topology, c: dict[str, float], n: float, p: int, k: int) -> float:
    ks, share = topo.kernel_s, topo.comm_sm_share

    def ag(nbytes: float) -> float:
        return collective_time(topo, "all_gather", p, nbytes)

    def rs(nbytes: float) -> float:
        return collective_time(topo, "reduce_scatter", p, nbytes)

    pairs = (("qkv", ag), ("o_proj", rs), ("gate_up", ag), ("down", rs))
    chunked = sum(chunked_time(c[m], comm, n, k, ks, share) for m, comm in pairs)
    alone = c["attention"] + c["act"] + 6 * ks  # 6 kernels, as composed
    return chunked + alone + 2 * epilogue_time(topo, n / p, fused=False)


def _token_split(
    topo: Topology,
    s: LayerShape,
    tokens: int,
    p: int,
    context: int,
    ar: Callable[[float], float],
) -> float:
    """Four half-blocks per layer (attention a, b; MLP a, b), each with the epilogue of the
    reduction before it; half b's attention also reads half a's keys (prefill)."""
    if tokens < 2:
        return float("inf")
    half = tokens // 2
    n = half * s.hidden * s.dtype_bytes
    epi, ks = epilogue_time(topo, n, fused=False), topo.kernel_s
    blocks = []
    for prior in (0, half):
        c = layer_compute(topo, s, half, p, prior=0 if context else prior, context=context)
        blocks.append(c["qkv"] + c["attention"] + c["o_proj"] + 3 * ks + epi)
    mlp = layer_compute(topo, s, half, p, context=context)
    blocks += 2 * [mlp["gate_up"] + mlp["act"] + mlp["down"] + 3 * ks + epi]
    return token_split_time(blocks, ar(n), topo.comm_sm_share)
