"""The fused TP ops: a collective together with the compute on either side of it.

A TP layer never sums a tensor for its own sake: the sum of the row-parallel projection is
added to the residual stream and normed (TensorRT-LLM's ``RESIDUAL_RMS_NORM`` fusion, vLLM's
``fuse_allreduce_rms``), and with sequence parallelism the gathered tokens are multiplied at
once and the scattered sum was a matmul a moment before (PyTorch async-TP's
``fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter``). Handing the strategy the op
with its compute lets it fuse passes over memory or overlap chunks of transfer and compute.

This module holds what every implementation must agree on: the op names, the input checks
(so a bad call fails the same way on every strategy, naming the op) and the reference
compute, :func:`rms_norm` with exactly the rounding of Hugging Face's ``LlamaRMSNorm`` (the
model's own :class:`~framework.model.layers.RMSNorm` does the same arithmetic, checked by a
test), so the composed op gives the model's bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

FUSED_OPS = ("all_reduce_add_rmsnorm", "all_gather_matmul", "matmul_reduce_scatter")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm: statistics in float32, the weight applied in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rmsnorm(summed: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple:
    """The epilogue of ``all_reduce_add_rmsnorm``: ``(rms_norm(residual + summed),
    residual + summed)``, the residual added first as the model always did."""
    new_residual = residual + summed
    return rms_norm(new_residual, weight, eps), new_residual


def gather_matmul(gathered: Tensor, weights: Sequence[Tensor]) -> tuple:
    """The epilogue of ``all_gather_matmul``: ``(gathered, [gathered @ w for w in weights])``."""
    return gathered, [torch.matmul(gathered, w) for w in weights]


def check_fused(op: str, x: Tensor, args: tuple, world_size: int) -> str | None:
    """What is wrong with a fused call's arguments beyond the first tensor (which the
    communicator checks like any input), or None: shapes, dtypes and devices that would
    otherwise fail deep inside a strategy, or differently on different strategies."""
    if not x.is_floating_point():
        return f"{op} needs a floating-point tensor, got {x.dtype}"
    if op == "all_reduce_add_rmsnorm":
        residual, weight, eps = args
        if x.dim() == 0:
            return f"{op} needs a tensor with a last dim (the hidden size), got a scalar"
        if not isinstance(residual, Tensor) or residual.shape != x.shape:
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual)
            return f"{op}: residual must have the partial sum's shape {tuple(x.shape)}, got {got}"
        bad = _mismatch(op, "residual", residual, x) or _mismatch(op, "weight", weight, x)
        if bad:
            return bad
        if not residual.is_contiguous():
            return f"{op}: residual must be contiguous"
        if weight.shape != (x.shape[-1],):
            return (
                f"{op}: weight must be 1-D of the hidden size {x.shape[-1]}, got "
                f"{tuple(weight.shape)}"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            return f"{op}: eps must be a number >= 0, got {eps!r}"
        return None
    if x.dim() != 2:
        return f"{op} needs a 2-D (tokens, features) tensor, got shape {tuple(x.shape)}"
    if op == "all_gather_matmul":
        (weights,) = args
        if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)) or not weights:
            return f"{op}: weights must be a non-empty list of 2-D tensors"
        for i, w in enumerate(weights):
            bad = _weight_problem(op, f"weights[{i}]", w, x)
            if bad:
                return bad
        return None
    (weight,) = args
    if x.shape[0] % world_size:
        return (
            f"{op} needs dim 0 divisible by the group size {world_size}, got shape "
            f"{tuple(x.shape)}: pad dim 0 to a multiple of it first"
        )
    return _weight_problem(op, "weight", weight, x)


def _weight_problem(op: str, what: str, w: object, x: Tensor) -> str | None:
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] != x.shape[1]:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        return f"{op}: {what} must be 2-D with {x.shape[1]} rows (x @ w), got {got}"
    return _mismatch(op, what, w, x)


def _mismatch(op: str, what: str, t: object, x: Tensor) -> str | None:
    if not isinstance(t, Tensor):
        return f"{op}: {what} must be a tensor, got {type(t).__name__}"
    if t.dtype != x.dtype:
        return f"{op}: {what} is {t.dtype} but the input is {x.dtype}"
    if t.device != x.device:
        return f"{op}: {what} is on {t.device} but the input is on {x.device}"
    return None


class Then:
    """A handle whose ``wait()`` waits ``handle`` and returns ``fn(result, *args)``."""

    __slots__ = ("args", "fn", "handle")

    def __init__(self, handle: Any, fn: Callable[..., Any], *args: Any) -> None:
        self.handle, self.fn, self.args = handle, fn, args

    def wait(self) -> Any:
        return self.fn(self.handle.wait(), *self.args)


class FusedFromCollectives:
    """The fused ops composed from an object's own ``all_reduce``, ``all_gather`` and
    ``reduce_scatter``: for stand-ins that are not a :class:`Communicator` (a test's
    threads-as-ranks group, the no-communication baseline), so they run the model as it is.
    A :class:`Communicator` composes them itself, below its counters."""

    def all_reduce_add_rmsnorm(self, partial: Tensor, residual: Tensor, weight: Tensor, eps):
        return Then(self.all_reduce(partial), add_rmsnorm, residual, weight, eps)  # type: ignore[attr-defined]

    def all_gather_matmul(self, shard: Tensor, weights: Sequence[Tensor]):
        return Then(self.all_gather(shard), gather_matmul, weights)  # type: ignore[attr-defined]

    def matmul_reduce_scatter(self, x: Tensor, weight: Tensor):
        return self.reduce_scatter(torch.matmul(x, weight))  # type: ignore[attr-defined]
