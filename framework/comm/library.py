"""What the library (torch.distributed) gives every strategy: the devices its collectives
handle per backend, the tensor forms of reduce-scatter and all-gather, their output shapes and
the bytes a rank sends in their ring form (nccl-tests' convention)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

# What the library collectives handle: gloo sums CPU tensors and CUDA tensors (staged through
# host memory), NCCL only CUDA tensors. A strategy narrows this where its transport cannot.
LIBRARY_SUPPORT: dict[str, frozenset[str]] = {
    "gloo": frozenset({"cpu", "cuda"}),
    "nccl": frozenset({"cuda"}),
}
HOST_ONLY: dict[str, frozenset[str]] = {"gloo": frozenset({"cpu"})}
# Point-to-point messages and reduce-to-root: gloo handles these for CPU tensors only.
HOST_OR_NCCL: dict[str, frozenset[str]] = {
    "gloo": frozenset({"cpu"}),
    "nccl": frozenset({"cuda"}),
}


def rs_output(x: Tensor, p: int) -> Tensor:
    """A new tensor for this rank's part of a reduce-scatter of ``x`` over ``p`` ranks."""
    return x.new_empty((x.shape[0] // p, *x.shape[1:]))


def ag_output(x: Tensor, p: int) -> Tensor:
    """A new tensor for the all-gather of ``x`` over ``p`` ranks (dim 0 times p)."""
    return x.new_empty((x.shape[0] * p, *x.shape[1:]))


# The library's tensor forms of the two ops: torch 2.13 renamed them (``*_single``) and warns
# on the old names, which older releases (the package takes torch>=2.3) only have.
library_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
library_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def library_wire_bytes(op: str, nbytes: int, p: int) -> int:
    """Bytes one rank sends in the library's ring form of ``op`` on ``nbytes`` of input
    (nccl-tests' bus-bandwidth convention): all-reduce 2(p-1)/p n, reduce-scatter (p-1)/p n,
    all-gather (p-1) n."""
    if op == "all_reduce":
        return 2 * (p - 1) * nbytes // p
    if op == "reduce_scatter":
        return (p - 1) * nbytes // p
    return (p - 1) * nbytes
