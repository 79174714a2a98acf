"""token_split: TokenWeave's schedule, for batch-1 prefill where micro-batches cannot help.

The model cuts each micro-batch's tokens into ``splits`` contiguous runs inside every layer (it
asks the communicator: :meth:`token_splits`) and interleaves them as it interleaves micro-
batches: run 1's attention reduction is in flight while run 2's attention computes, and so on.
Reductions are launched asynchronously through ``inner``, as ``async_overlap`` does. Below
``min_tokens`` tokens per micro-batch (default 1,024, where TokenWeave reports its gains start)
nothing is cut: on this host halves of 128 tokens cost 0.66-0.78x of TTFT in per-op overhead,
and 1,024-2,048 tokens came out within noise (0.92-1.10 at TP 2, results/fusion_overlap). A
later run's attention reads the earlier run's keys and values from the cache, so the result is
the same attention; the matmuls run on fewer rows and may round differently (tokens are checked
against the exact run, like every strategy's).

Devices: those of ``inner``.
"""

from __future__ import annotations

from typing import Any

from framework import register_strategy
from strategies.async_overlap import AsyncOverlap


@register_strategy("token_split")
class TokenSplit(AsyncOverlap):  # reductions launched as async_overlap's
    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_at_least(2, splits=options["splits"])
        cls.require_at_least(0, min_tokens=options["min_tokens"])

    def __init__(self, group=None, *, splits: int = 2, min_tokens: int = 1024, **rest: Any) -> None:
        super().__init__(group, **rest)
        self.splits, self.min_tokens = splits, min_tokens

    def token_splits(self, tokens: int) -> int:
        return self.splits if tokens >= self.min_tokens else 1
