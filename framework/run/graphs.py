"""The decode step under a CUDA graph (``parallel.cuda_graphs=true``).

GPU serving stacks capture the decode step once and replay it per token, so the host launches
one graph instead of hundreds of kernels. The collectives inside are captured too, which only
some communicators allow (``Communicator.graph_safe``: a NCCL collective on the capturing
stream can be captured; a progress thread or host-side transport cannot). The runner refuses a
run with a communicator that is not graph-safe before anything is captured.

The graph reads its inputs from fixed buffers (tokens and the cache position) and runs
:meth:`TPLlama.decode_static`, whose shapes do not depend on the position. Counters: the
collectives of a replay run on the device without passing through Python, so the capture's
counts per step are added to ``comm.stats`` for every replay (``wait_s`` excepted: no host time
is spent in a replay; exposed communication is then part of the step time, as on a GPU stack).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

_COUNTED = ("calls", "collectives", "bytes", "wire_bytes", "wait_s")


def _counters(stats: Any) -> dict[str, float]:
    """Every counter a replay changes: the totals and each op's (``"<op>/<counter>"``)."""
    out = {k: getattr(stats, k) for k in _COUNTED}
    for op, counters in stats.by_op.items():
        out.update({f"{op}/{k}": v for k, v in counters.items()})
    return out


def _restore(stats: Any, values: dict[str, float]) -> None:
    for k, v in values.items():
        op, _, counter = k.rpartition("/")
        if op:
            stats.by_op[op][counter] = v
        else:
            setattr(stats, k, v)


class GraphDecode:
    """``decode_step`` for :func:`framework.model.generate.generate`.

    Captures on the first call (after the prefill has allocated the KV cache). With
    ``capture=False`` the same static step runs eagerly: the path the tests check on a CPU.
    """

    def __init__(self, model: Any, comm: Any, micro_batches: int, capture: bool = True) -> None:
        self.model, self.comm = model, comm
        self.micro_batches = micro_batches
        self.capture = capture
        self.graph: Any = None
        self.tokens: Tensor | None = None  # the graph's inputs, allocated on the first call
        self.capture_s = 0.0
        self._per_step: dict[str, float] = {}

    def __call__(self, tokens: Tensor) -> Tensor:
        model = self.model
        if self.tokens is None:
            self._build(tokens)
        self.tokens.copy_(tokens)
        self.pos.fill_(model.cache_pos)
        if self.capture:
            self.graph.replay()
            self._replayed(self.comm.stats)
            out = self.logits
        else:
            out = model.decode_static(self.tokens, self.pos, self.micro_batches)
        model.cache_pos += 1
        return out.clone()

    def _build(self, tokens: Tensor) -> None:
        model, device = self.model, self.model.device
        self.tokens = torch.zeros_like(tokens, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        if not self.capture:
            return
        t0 = time.perf_counter()
        stats = self.comm.stats
        before = _counters(stats)
        self.tokens.copy_(tokens)
        self.pos.fill_(model.cache_pos)
        # Warm-up on a side stream (lazy initialisation must not be captured), then capture.
        # Both write the KV slot at cache_pos, which the first replay writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.decode_static(self.tokens, self.pos, self.micro_batches)
        torch.cuda.current_stream(device).wait_stream(side)
        mid = _counters(stats)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_static(self.tokens, self.pos, self.micro_batches)
        torch.cuda.synchronize(device)
        after = _counters(stats)
        self._per_step = {k: after[k] - mid[k] for k in after if not k.endswith("wait_s")}
        _restore(stats, before)  # warm-up and capture are set-up, not decode steps
        self.capture_s = time.perf_counter() - t0

    def _replayed(self, stats: Any) -> None:
        """Count one replay: the capture's collectives, totals and per op (no wait time)."""
        now = _counters(stats)
        _restore(stats, {k: now[k] + self._per_step.get(k, 0) for k in now})
