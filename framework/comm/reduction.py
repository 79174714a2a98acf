"""The rank-order sum shared by every strategy that sums in rank order (``shm``, ``oneshot``).

``summation_order = "rank"`` promises the same bits wherever the sum is taken: term 0 + term 1
+ ... per element. 16-bit floats are summed in float32 and rounded once at the end, as the
native shm path (``_shm_native.c``) and fused GPU all-reduces do: with two terms that is what
torch's add already does; with more, rounding after each add would lose bits for nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def sum_rank_order(terms: list[Tensor], out: Tensor) -> None:
    """``out = terms[0] + terms[1] + ...`` in that order (at least two terms; ``out`` may be
    one of them only if it is ``terms[0]``)."""
    if len(terms) > 2 and out.dtype in _HALF:
        acc = terms[0].float()
        for t in terms[1:]:
            acc.add_(t)
        out.copy_(acc)
        return
    torch.add(terms[0], terms[1], out=out)
    for t in terms[2:]:
        out.add_(t)
