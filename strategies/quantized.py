"""quantized: the wire carries blockwise-quantized values (int8, int4, fp8), not the input dtype.

What QuickReduce, TensorRT-LLM's low-precision all-reduce and vLLM's fp8 paths do: each rank
quantizes its input per block of ``block`` elements (:mod:`framework.comm.quant`), the ranks
exchange the narrow payloads through ``inner`` (default ``naive``), and every rank decodes and
accumulates in float32 in rank order. Every rank decodes the same payloads, so every rank gets
the same bits (TP ranks must keep identical activations).

* ``algo=oneshot``: all-gather the payloads, every rank sums all p (one step; each rank sends
  one payload to each peer).
* ``algo=twoshot``: all-to-all of payload chunks (the library's, on the private group), each
  rank sums its chunk, quantizes the partial sum again and all-gathers it through ``inner``:
  two steps and two quantizations, a p-th of the data per peer.

``reduce_scatter`` is the all-to-all half; ``all_gather`` gathers payloads and decodes them
(every rank, its own row included, gets the decoded values). Below ``min_bytes``, for integer
and float64 inputs and at world size 1, the exact path is taken: ``inner``'s own op.

Error per element (:meth:`Quantized.error_bound`, checked by the conformance kit): each
input's quantization error (half a step at its block's scale; floats: a relative half-ulp),
summed over ranks, plus the requantization of the partial sum (twoshot) and float rounding.

Devices: those of ``inner`` (twoshot: and of the library's all-to-all).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from framework import Composed, register_strategy
from framework.comm import quant

_U = 2.0**-24


@register_strategy("quantized")
class Quantized(Composed):
    exact = False

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_one_of("fmt", options["fmt"], tuple(quant.FORMATS))
        cls.require_one_of("algo", options["algo"], ("oneshot", "twoshot"))
        block = options["block"]
        cls.require_positive(block=block)
        if block % 8:
            raise ValueError(f"strategy {cls.name!r}: block must be a multiple of 8, got {block}")
        cls.require_at_least(0, min_bytes=options["min_bytes"])

    def __init__(
        self,
        group=None,
        *,
        fmt: str = "int8",
        block: int = 128,
        min_bytes: int = 0,
        algo: str = "oneshot",
        **options: Any,
    ) -> None:
        super().__init__(group, **options)
        self.exact = False
        self.fmt, self.block, self.min_bytes, self.algo = fmt, block, min_bytes, algo

    # -- which path ------------------------------------------------------------------------
    def quantizes(self, x: Tensor) -> bool:
        """Whether ``x`` goes on the wire quantized (else: the exact path, inner's op)."""
        return self.world_size > 1 and x.dtype in quant.QUANTIZABLE and x.nbytes >= self.min_bytes

    def _payload(self, numel: int) -> int:
        return quant.payload_bytes(self.fmt, numel, self.block)

    def _count(self, x: Tensor, op: str = "all_reduce") -> None:
        """Wire bytes of the payloads actually sent (the exact path: inner's figures)."""
        if self.quantizes(x):
            sent = self._sent(op, x.numel())
        else:
            sent = self.inner.op_wire_bytes(op, x.nbytes)
        self.stats.count_collective(op, sent)

    def _sent(self, op: str, numel: int) -> int:
        """Bytes this rank sends for ``op`` on ``numel`` values, quantized."""
        if op == "all_gather" or (op == "all_reduce" and self.algo == "oneshot"):
            return self.inner.op_wire_bytes("all_gather", self._payload(numel))
        chunk = self._payload(-(-numel // self.world_size))
        sent = (self.world_size - 1) * chunk  # the all-to-all
        if op == "all_reduce":
            sent += self.inner.op_wire_bytes("all_gather", chunk)
        return sent

    # -- the ops ---------------------------------------------------------------------------
    def reduce_(self, x: Tensor) -> None:
        if not self.quantizes(x):
            self.inner_op("all_reduce", x, x)
            return
        flat = x.view(-1)
        if self.algo == "oneshot":
            rows = self._gather(flat)
            acc = quant.decode(rows[0], self.fmt, self.block, flat.numel())
            for j in range(1, self.world_size):
                acc += quant.decode(rows[j], self.fmt, self.block, flat.numel())
            flat.copy_(acc)
            return
        p, n = self.world_size, flat.numel()
        c = -(-n // p)
        padded = flat.new_zeros(p * c) if c * p != n else flat
        if padded is not flat:
            padded[:n].copy_(flat)
        part = self._scatter(padded.view(p, c))  # float32, my chunk of the sum
        rows = self._gather(part)
        for j in range(p):  # my own chunk too: every rank decodes the same payloads
            lo, hi = j * c, min((j + 1) * c, n)
            if lo < hi:
                flat[lo:hi].copy_(quant.decode(rows[j], self.fmt, self.block, c)[: hi - lo])

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        if not self.quantizes(x):
            self.inner_op("reduce_scatter", x, out)
            return
        out.view(-1).copy_(self._scatter(x.view(self.world_size, -1)))

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        if not self.quantizes(x):
            self.inner_op("all_gather", x, out)
            return
        n = x.numel()
        rows = self._gather(x.view(-1))
        dst = out.view(self.world_size, n)
        for j in range(self.world_size):
            dst[j].copy_(quant.decode(rows[j], self.fmt, self.block, n))

    def _gather(self, flat: Tensor) -> Tensor:
        """Every rank's payload of ``flat``, one row per rank (through ``inner``)."""
        size = self._payload(flat.numel())
        mine = torch.empty(size, dtype=torch.uint8, device=flat.device)
        quant.encode(flat, self.fmt, self.block, mine)
        rows = torch.empty(self.world_size * size, dtype=torch.uint8, device=flat.device)
        self.inner_op("all_gather", mine, rows)
        return rows.view(self.world_size, size)

    def _scatter(self, chunks: Tensor) -> Tensor:
        """This rank's chunk of the sum of every rank's ``chunks`` (p rows), float32: the
        payloads of chunk j go to rank j (all-to-all), which decodes them in rank order."""
        p, c = chunks.shape
        size = self._payload(c)
        send = torch.empty(p, size, dtype=torch.uint8, device=chunks.device)
        for j in range(p):
            quant.encode(chunks[j], self.fmt, self.block, send[j])
        recv = torch.empty_like(send)
        self.library(dist.all_to_all_single, recv, send)
        acc = quant.decode(recv[0], self.fmt, self.block, c)
        for j in range(1, p):
            acc += quant.decode(recv[j], self.fmt, self.block, c)
        return acc

    def wire_bytes(self, nbytes: int) -> int:
        """For a float32 message of ``nbytes`` (the per-call figure is counted per dtype)."""
        return self._sent("all_reduce", nbytes // 4)

    # -- what it promises ------------------------------------------------------------------
    def error_bound(self, op: str, inputs: list[Tensor], rank: int) -> Tensor:
        """Per element of ``rank``'s result (float64), see the module docstring."""
        x0 = inputs[0]
        p = len(inputs)
        if not self.quantizes(x0):  # the exact path: float rounding of any summation order
            if op == "all_gather" or not x0.is_floating_point():
                shape = (p * x0.shape[0], *x0.shape[1:]) if op == "all_gather" else x0.shape
                return _rows(op, torch.zeros(shape, dtype=torch.float64), rank, p)
            mag = sum(x.double().abs() for x in inputs)
            return _rows(op, (p - 1) * torch.finfo(x0.dtype).eps * mag, rank, p)
        cast = torch.finfo(x0.dtype).eps / 2  # rounding the float32 result to the dtype
        if op == "all_gather":
            rows = []
            for x in inputs:
                b = quant.error_bound(x.reshape(-1), self.fmt, self.block)
                rows.append((b + cast * (x.double().abs().view(-1) + b)).view(x.shape))
            return torch.cat(rows)
        if op == "all_reduce" and self.algo == "oneshot":
            layout = [x.reshape(1, -1) for x in inputs]
        else:  # each rank's input in p chunks, quantized chunk by chunk
            n = x0.numel()
            c = -(-n // p)
            layout = [torch.nn.functional.pad(x.reshape(-1), (0, p * c - n)) for x in inputs]
            layout = [x.view(p, c) for x in layout]
        err = sum(
            torch.stack([quant.error_bound(row, self.fmt, self.block) for row in x]) for x in layout
        )
        mag = sum(x.double().abs() for x in layout) + err  # |decoded| per rank, summed
        total = err + (p - 1) * _U * mag
        if op == "all_reduce" and self.algo == "twoshot":  # the partial sums, quantized again
            f = quant.FORMATS[self.fmt]
            s = mag.amax() / f.qmax
            total = total + f.rel * mag * (1 + 2**-20) + s * (f.sub + 4 * f.qmax * _U)
            total = total + 2 * _U * (mag.amax() + s + mag)
            mag = mag + total
        total = (total + cast * mag).reshape(-1)[: x0.numel()]
        return _rows(op, total.view(x0.shape), rank, p)


def _rows(op: str, full: Tensor, rank: int, p: int) -> Tensor:
    """``full`` (the whole sum's shape) cut to what ``op`` leaves on ``rank``."""
    if op != "reduce_scatter":
        return full
    rows = full.shape[0] // p
    return full[rank * rows : (rank + 1) * rows]
