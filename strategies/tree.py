"""tree: binary-tree reduce to rank 0, then broadcast back down, from point-to-point messages.

Rank r's children are 2r+1 and 2r+2 (any world size, powers of two or not). The reduce phase
takes about log2(p) steps and the broadcast as many, against the ring's 2(p-1), but every step
carries the whole message, so it wins only where latency dominates (small messages, many
ranks). Messages are cut into ``chunk_bytes`` chunks that flow through the tree as a pipeline:
a rank forwards chunk c to its parent while its children already send chunk c+1 (Sanders,
Speck and Traeff 2009; NCCL's tree is the same idea). Changes the summation order: element
sums are (own + left subtree) + right subtree, exact for integers, within float rounding of
the library's order for floats; every rank receives the same bits (the root broadcasts them).

Devices: CPU tensors on gloo, CUDA tensors on NCCL (gloo's point-to-point calls take host
memory only).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from framework import HOST_OR_NCCL, Algorithm, register_strategy
from framework.comm.buffers import BufferPool, view_as


@register_strategy("tree")
class Tree(Algorithm):
    summation_order = "tree"  # (own + left subtree) + right subtree, whatever the size
    supports = HOST_OR_NCCL

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_positive(chunk_bytes=options["chunk_bytes"])

    def __init__(self, group=None, *, chunk_bytes: int = 1 << 20, **common: Any) -> None:
        self.chunk_bytes = chunk_bytes
        super().__init__(group, **common)
        r, p = self.rank, self.world_size
        self.children = [self.global_rank(c) for c in (2 * r + 1, 2 * r + 2) if c < p]
        self.parent = self.global_rank((r - 1) // 2) if r > 0 else None
        self._pool = BufferPool(self.stats, max_free=2)

    def wire_bytes(self, nbytes: int) -> int:
        # reduce: one message up to the parent; broadcast: one message down to each child
        return nbytes * ((self.parent is not None) + len(self.children))

    def reduce_(self, x: Tensor) -> None:
        if self.world_size == 1:
            return
        flat = x.view(-1)
        step = max(1, self.chunk_bytes // x.element_size())
        chunks = [(lo, min(lo + step, flat.numel())) for lo in range(0, flat.numel(), step)]
        scratch = [
            self._pool.acquire(min(step, flat.numel()), x.dtype, x.device) for _ in self.children
        ]
        ok = False
        try:
            sends = []
            for tag, (lo, hi) in enumerate(chunks):  # reduce towards rank 0, chunk by chunk
                seg = flat[lo:hi]
                bufs = [view_as(s, hi - lo, x.dtype) for s in scratch]
                recvs = [dist.irecv(b, c, self.group, tag) for b, c in zip(bufs, self.children)]
                for w, b in zip(recvs, bufs):
                    self.wait_work(w)
                    seg.add_(b)
                if self.parent is not None:
                    sends.append(dist.isend(seg, self.parent, self.group, tag))
            for w in sends:  # the broadcast below overwrites seg: the sends must be done
                self.wait_work(w)
            sends = []
            for tag, (lo, hi) in enumerate(chunks):  # broadcast from rank 0
                seg = flat[lo:hi]
                if self.parent is not None:
                    self.wait_work(dist.irecv(seg, self.parent, self.group, tag))
                sends += [dist.isend(seg, c, self.group, tag) for c in self.children]
            for w in sends:
                self.wait_work(w)
            ok = True
        finally:  # after a failure a posted receive may still write into its scratch: drop it
            for s in scratch:
                (self._pool.release if ok else self._pool.discard)(s)

    def _release(self) -> None:
        super()._release()
        self._pool.clear()
