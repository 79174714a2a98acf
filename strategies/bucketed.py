"""bucketed: hold calls, coalesce them into one flat buffer per op and dtype, one collective each.

Every collective pays a fixed latency (alpha); fusing k small messages pays it once instead of
k times, as Horovod's tensor fusion and DDP's gradient buckets do. A bucket goes on the wire
when it reaches ``bucket_bytes`` or at the first ``wait()``/``flush()`` (which launches every
open bucket in creation order, so all ranks issue the same collectives). A tensor alone in its
bucket is reduced in place, without a copy. It wins only when several independent tensors are
issued before a wait (micro-batches in the TP runner, many small tensors in the benchmark);
with one tensor per wait it is ``naive`` plus a little bookkeeping. Summation order per element
is the inner algorithm's, so results equal the inner algorithm's exactly.

All three ops fuse, each with its own kind (a bucket holds one op, one dtype, one device):
all-reduce inputs are packed end to end; reduce-scatter inputs are packed so that the bucket's
rank-r part is every tensor's rank-r part in turn (``(p, rows)`` views concatenated along the
columns), so one reduce-scatter of the bucket hands each rank exactly its parts; all-gather
inputs are packed end to end and each tensor's rows are picked out of every rank's block.

Devices: those of ``inner``; a bucket's buffer lives on its device.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from framework import Handle, Schedule, register_strategy
from framework.comm.buffers import BufferPool, view_as


class _Bucket:
    __slots__ = (
        "buf",
        "done",
        "dtype",
        "failed",
        "future",
        "key",
        "nbytes",
        "numel",
        "op",
        "results",
        "tensors",
    )

    def __init__(self, key: tuple[str, torch.dtype, torch.device]) -> None:
        self.key = key
        self.op, self.dtype = key[0], key[1]
        self.tensors: list[Tensor] = []
        self.numel = self.nbytes = 0
        self.future: Future | None = None
        self.buf: Tensor | None = None  # packed input (and, for all_reduce, the output)
        self.results: list[Tensor] = []  # reduce_scatter / all_gather: one output per tensor
        self.done = self.failed = False


@register_strategy("bucketed")
class Bucketed(Schedule):
    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_positive(bucket_bytes=options.get("bucket_bytes"))

    def __init__(self, group=None, *, bucket_bytes: int = 1 << 20, **rest: Any) -> None:
        self.bucket_bytes = bucket_bytes
        super().__init__(group, **rest)
        self._pool = BufferPool(self.stats)
        self._open: dict[tuple[str, torch.dtype, torch.device], _Bucket] = {}
        self._order: list[_Bucket] = []  # open buckets in creation order
        self.in_flight = 0  # buckets launched and not yet completed

    def threshold(self) -> int:
        """Bytes at which a bucket goes on the wire (the adaptive strategy overrides this)."""
        return self.bucket_bytes

    def _all_reduce(self, x: Tensor) -> Handle:
        return self._hold("all_reduce", x)

    def _reduce_scatter(self, x: Tensor) -> Handle:
        return self._hold("reduce_scatter", x)

    def _all_gather(self, x: Tensor) -> Handle:
        return self._hold("all_gather", x)

    def _hold(self, op: str, x: Tensor) -> Handle:
        nbytes = x.numel() * x.element_size()
        key = (op, x.dtype, x.device)  # a bucket is one flat buffer: one op, dtype, device
        b = self._open.get(key)
        if b is not None and b.nbytes + nbytes > self.threshold():
            self._launch(b)
            b = None
        if b is None:
            b = self._open[key] = _Bucket(key)
            self._order.append(b)
        i = len(b.tensors)
        b.tensors.append(x)
        b.numel += x.numel()
        b.nbytes += nbytes
        if b.nbytes >= self.threshold():
            self._launch(b)
        return Handle(self, lambda: self._finish(b, i))

    def _launch(self, b: _Bucket) -> None:
        del self._open[b.key]
        self._order.remove(b)
        self.in_flight += 1
        inner, p = self.inner, self.world_size
        if len(b.tensors) == 1:  # alone: no packing
            x = b.tensors[0]
            b.future = self.launch(x, b.op, inner.output(b.op, x))
            return
        b.buf = self._pool.acquire(b.numel, b.dtype, b.key[2])
        flat = view_as(b.buf, b.numel, b.dtype)
        if b.op == "reduce_scatter":  # row r of the (p, numel / p) view: every rank-r part
            torch.cat([t.view(p, -1) for t in b.tensors], dim=1, out=flat.view(p, -1))
        else:
            torch.cat([t.view(-1) for t in b.tensors], out=flat)
        b.future = self.launch(flat, b.op, inner.output(b.op, flat))

    def _flush(self) -> None:
        for b in list(self._order):
            self._launch(b)

    def _finish(self, b: _Bucket, i: int) -> Tensor:
        if b.future is None:
            self._flush()
        if b.failed:  # every tensor of a failed bucket gets the failure, never its input back
            b.future.result()
        if not b.done:
            try:
                out = b.future.result()
            except BaseException:
                if b.future.done():  # failed, not interrupted: the bucket is over
                    self._retire(b, None)
                raise
            self._retire(b, out)
            self._on_bucket_done(b)
        return b.tensors[i] if b.op == "all_reduce" else b.results[i]

    def _retire(self, b: _Bucket, out: Tensor | None) -> None:
        """The bucket's collective is over (``out`` its result; None if it failed): hand
        every tensor its result and give the buffer back (a failed one's buffer is dropped:
        a timed-out transfer may still write into it)."""
        b.done, b.failed = True, out is None
        self.in_flight -= 1
        if out is not None:
            b.results = self._unpack(b, out)
        if b.buf is None:
            return
        if out is None:
            self._pool.discard(b.buf)
        else:
            self._pool.release(b.buf)
        b.buf = None

    def _unpack(self, b: _Bucket, out: Tensor) -> list[Tensor]:
        p, ts = self.world_size, b.tensors
        if len(ts) == 1:
            return [out]
        results, off = [], 0
        if b.op == "all_reduce":  # back into the callers' tensors
            for t in ts:
                t.view(-1).copy_(out[off : off + t.numel()])
                off += t.numel()
            return []
        if b.op == "reduce_scatter":  # out: this rank's part of every tensor, in turn
            for t in ts:
                n = t.numel() // p
                results.append(out[off : off + n].view(t.shape[0] // p, *t.shape[1:]))
                off += n
            return results
        blocks = out.view(p, -1)  # all_gather: rank j's block holds every tensor of rank j
        for t in ts:
            n = t.numel()
            results.append(blocks[:, off : off + n].reshape(p * t.shape[0], *t.shape[1:]))
            off += n
        return results

    def _on_bucket_done(self, b: _Bucket) -> None:
        """Hook for subclasses (the adaptive strategy refits here)."""

    def _release(self) -> None:
        super()._release()
        self._pool.clear()
