"""bucketed: hold calls, coalesce them into one flat buffer per dtype, one collective per bucket.

Every collective pays a fixed latency (alpha); fusing k small messages pays it once instead of
k times, as Horovod's tensor fusion and DDP's gradient buckets do. A bucket goes on the wire
when it reaches ``bucket_bytes`` or at the first ``wait()``/``flush()`` (which launches every
open bucket in creation order, so all ranks issue the same collectives). A tensor alone in its
bucket is reduced in place, without a copy. It wins only when several independent tensors are
issued before a wait (micro-batches in the TP runner, many small tensors in the benchmark);
with one tensor per wait it is ``naive`` plus a little bookkeeping. Summation order per element
is the inner algorithm's, so results equal the inner algorithm's exactly.

Devices: those of ``inner``; a bucket holds one dtype on one device, in a buffer on that device.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from framework import Handle, Schedule, register_strategy
from framework.comm.buffers import BufferPool, view_as


class _Bucket:
    __slots__ = ("buf", "done", "dtype", "failed", "future", "key", "nbytes", "numel", "tensors")

    def __init__(self, key: tuple[torch.dtype, torch.device]) -> None:
        self.key = key
        self.dtype = key[0]
        self.tensors: list[Tensor] = []
        self.numel = self.nbytes = 0
        self.future: Future | None = None
        self.buf: Tensor | None = None
        self.done = self.failed = False


@register_strategy("bucketed")
class Bucketed(Schedule):
    def __init__(self, group=None, *, bucket_bytes: int = 1 << 20, **rest: Any) -> None:
        self.require_positive(bucket_bytes=bucket_bytes)
        self.bucket_bytes = bucket_bytes
        super().__init__(group, **rest)
        self._pool = BufferPool(self.stats)
        self._open: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        self._order: list[_Bucket] = []  # open buckets in creation order
        self.in_flight = 0  # buckets launched and not yet completed

    def threshold(self) -> int:
        """Bytes at which a bucket goes on the wire (the adaptive strategy overrides this)."""
        return self.bucket_bytes

    def _all_reduce(self, x: Tensor) -> Handle:
        nbytes = x.numel() * x.element_size()
        key = (x.dtype, x.device)  # a bucket is one flat buffer: one dtype, one device
        b = self._open.get(key)
        if b is not None and b.nbytes + nbytes > self.threshold():
            self._launch(b)
            b = None
        if b is None:
            b = self._open[key] = _Bucket(key)
            self._order.append(b)
        b.tensors.append(x)
        b.numel += x.numel()
        b.nbytes += nbytes
        if b.nbytes >= self.threshold():
            self._launch(b)
        return Handle(self, lambda: self._finish(b, x))

    def _launch(self, b: _Bucket) -> None:
        del self._open[b.key]
        self._order.remove(b)
        self.in_flight += 1
        if len(b.tensors) == 1:
            b.future = self.inner.launch(b.tensors[0])
            return
        b.buf = self._pool.acquire(b.numel, b.dtype, b.key[1])
        flat = view_as(b.buf, b.numel, b.dtype)
        torch.cat([t.view(-1) for t in b.tensors], out=flat)
        b.future = self.inner.launch(flat)

    def _flush(self) -> None:
        for b in list(self._order):
            self._launch(b)

    def _finish(self, b: _Bucket, x: Tensor) -> Tensor:
        if b.future is None:
            self._flush()
        if b.failed:  # every tensor of a failed bucket gets the failure, never its input back
            b.future.result()
        if not b.done:
            try:
                b.future.result()
            except BaseException:
                if b.future.done():  # failed, not interrupted: the bucket is over
                    self._retire(b, failed=True)
                raise
            self._retire(b, failed=False)
            self._on_bucket_done(b)
        return x

    def _retire(self, b: _Bucket, failed: bool) -> None:
        """The bucket's collective is over: copy the sums out and give its buffer back (a
        failed one's buffer is dropped: a timed-out transfer may still write into it)."""
        b.done, b.failed = True, failed
        self.in_flight -= 1
        if b.buf is None:
            return
        if failed:
            self._pool.discard(b.buf)
        else:
            flat, off = view_as(b.buf, b.numel, b.dtype), 0
            for t in b.tensors:
                t.view(-1).copy_(flat[off : off + t.numel()])
                off += t.numel()
            self._pool.release(b.buf)
        b.buf = None

    def _on_bucket_done(self, b: _Bucket) -> None:
        """Hook for subclasses (the adaptive strategy refits here)."""

    def _release(self) -> None:
        super()._release()
        self._pool.clear()
