"""overlap: PyTorch async-TP's decomposition of the sequence-parallel ops, over any ``inner``.

``matmul_reduce_scatter`` and ``all_gather_matmul`` are a matmul and a collective that depend
on each other; done whole, one waits for the other. Split over the token dimension into
``chunks`` (default p) they pipeline: chunk i's collective is in flight (on the inner
algorithm's progress thread, or CUDA stream) while chunk i+1 is multiplied, so only the first
transfer (all-gather) or the last (reduce-scatter) is exposed, plus a start-up per chunk.

* ``matmul_reduce_scatter``: chunk c holds, for every rank j, rows ``[c q/C, (c+1) q/C)`` of
  j's block (q = n/p rows each), so each chunk is a whole reduce-scatter that leaves this
  rank its rows of the chunk, written straight into its place in the result.
* ``all_gather_matmul``: every chunk's all-gather is launched at once; meanwhile this rank
  multiplies its own shard (which needs no transfer), then each chunk's rows in ring order
  (rank r+1, r+2, ...) as the chunk lands. The chunk's all-gather brings every rank's rows of
  it together (an inner algorithm's collective, not point-to-point sends), so the ring order
  is the order of multiplication, not of arrival.

Below ``min_tokens`` rows in all (default 1,024) chunking cannot pay its start-up and the op is
the plain composition: on this host chunks cost 0.51-0.71x of TTFT at 128 tokens and came out
within noise at 1,024-2,048 (0.95-1.04 at TP 2, results/fusion_overlap), and the cost model
puts the GPU crossover at 512 (Llama-3-70B) to 2,048 tokens (8B) at TP 8
(results/simulate/overlap.md). The all-reduce and the fused all-reduce + add + norm are
launched whole, as ``async_overlap`` does. Summation order is the inner algorithm's; the
chunked matmuls may round differently from one whole matmul (the kit holds them to a stated
tolerance).

Devices: those of ``inner``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from framework import Handle, register_strategy
from framework.comm.library import ag_output
from strategies.async_overlap import AsyncOverlap


def _ranges(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous [lo, hi) runs covering ``n``, floor/ceil sized."""
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


@register_strategy("overlap")
class Overlap(AsyncOverlap):  # all-reduces launched whole, as async_overlap's
    chunked_ops = frozenset({"all_gather_matmul", "matmul_reduce_scatter"})

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_positive(chunks=options["chunks"])
        cls.require_at_least(0, min_tokens=options["min_tokens"])

    def __init__(
        self, group=None, *, chunks: int | None = None, min_tokens: int = 1024, **rest: Any
    ) -> None:
        super().__init__(group, **rest)
        self.chunks = chunks or self.world_size
        self.min_tokens = min_tokens
        self.stats.extra["overlap_chunked"] = 0.0  # fused calls that were chunked

    def _pieces(self, rows: int, total: int) -> list[tuple[int, int]] | None:
        """The chunks of ``rows`` rows per rank, or None to compose plainly."""
        k = min(self.chunks, rows)
        if self.world_size == 1 or k < 2 or total < self.min_tokens:
            return None
        self.stats.extra["overlap_chunked"] += 1
        return _ranges(rows, k)

    def _matmul_reduce_scatter(self, x: Tensor, weight: Tensor) -> Handle:
        p, n = self.world_size, x.shape[0]
        q = n // p
        pieces = self._pieces(q, n)
        if pieces is None:
            return super()._matmul_reduce_scatter(x, weight)
        out = x.new_empty(q, weight.shape[1])  # my rows of the sum
        blocks = x.view(p, q, x.shape[1])
        futures = []
        for lo, hi in pieces:
            part = self.compute(torch.matmul, blocks[:, lo:hi], weight)  # (p, hi - lo, out)
            part = part.view(p * (hi - lo), -1)  # every rank's rows of chunk c, rank order
            futures.append(self.launch(part, "reduce_scatter", out[lo:hi]))

        def finish() -> Tensor:
            for fut in futures:
                fut.result()
            return out

        return Handle(self, finish)

    def _all_gather_matmul(self, shard: Tensor, weights: list[Tensor]) -> Handle:
        p, r, q = self.world_size, self.rank, shard.shape[0]
        pieces = self._pieces(q, p * q)
        if pieces is None:
            return super()._all_gather_matmul(shard, weights)
        launched = []
        for lo, hi in pieces:
            src = shard[lo:hi]
            launched.append((lo, hi, self.launch(src, "all_gather", ag_output(src, p))))
        gathered = ag_output(shard, p)
        outs = [shard.new_empty(p * q, w.shape[1]) for w in weights]

        def multiply(rows: Tensor, at: int) -> None:
            gathered[at : at + rows.shape[0]].copy_(rows)
            for w, o in zip(weights, outs):
                torch.matmul(rows, w, out=o[at : at + rows.shape[0]])

        def finish() -> tuple[Tensor, list[Tensor]]:
            self.compute(multiply, shard, r * q)  # my own rows need no transfer
            for lo, hi, fut in launched:
                chunk = fut.result().view(p, hi - lo, -1)
                for k in range(1, p):
                    j = (r + k) % p
                    self.compute(multiply, chunk[j], j * q + lo)
            return gathered, outs

        return Handle(self, finish)
