"""hierarchical: reduce inside each node, all-reduce across node leaders, broadcast back.

Fast intra-node links (NVLink, shared memory) carry the full message once; only one rank per
node crosses the slow inter-node link, so inter-node traffic falls by the node size. The node
map comes from ``ranks_per_node`` (emulate nodes on one host), else the launcher: torchrun's
``LOCAL_WORLD_SIZE`` or SLURM's ``SLURM_NTASKS_PER_NODE``; else all ranks are one node. Nodes
are contiguous blocks of group ranks; the last may be smaller. Sub-groups are created once at
construction, each rank creating the groups it belongs to in the same order. Changes the
summation order (node sums first), exact for integers; every rank gets the leader's bits.

``intra`` picks the intra-node transport: ``library`` (reduce to the leader and broadcast
with the backend's collectives) or ``shm`` (a shared-memory segment per node, see
:mod:`framework.comm.shm`: every node rank gets the node sum from the segment, leaders all-reduce
across nodes with the library, and the leader's result is broadcast through the segment).

Reduce-scatter and all-gather are two-level too when every node has the same number of ranks
g (p = m g): the input is reordered so that node-local rank l holds the parts of every rank
with local index l, reduce-scattered inside the node, then reduce-scattered across the nodes
among the ranks of the same local index (a "rail"); all-gather runs the rails first, then the
node, and reorders back. With uneven nodes they are the library's, flat. Both use the
library's groups inside a node, also with ``intra=shm``.

Devices: CPU tensors on gloo (gloo's reduce takes host memory only), CUDA tensors on NCCL with
``intra=library``; ``intra=shm`` is gloo and CPU only.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from framework import HOST_OR_NCCL, Algorithm, CommError, register_strategy
from framework.comm.env import ranks_per_node_from_env
from framework.comm.groups import acquire_group, release_group
from framework.comm.library import library_all_gather, library_reduce_scatter
from framework.comm.shm import shm_native, shm_segment_for

INTRA = ("library", "shm")


@register_strategy("hierarchical")
class Hierarchical(Algorithm):
    supports = HOST_OR_NCCL

    @classmethod
    def option_rules(cls, options: dict[str, Any]) -> None:
        cls.require_at_least(1, ranks_per_node=options["ranks_per_node"])
        cls.require_one_of("intra", options["intra"], INTRA)
        cls.require_positive(chunk_bytes=options["chunk_bytes"])

    def __init__(
        self,
        group=None,
        *,
        ranks_per_node: int | None = None,
        intra: str = "library",
        chunk_bytes: int = 1 << 20,
        **common: Any,
    ) -> None:
        super().__init__(group, **common)
        if intra == "shm" and self.backend != "gloo":
            raise CommError(
                f"strategy {self.name!r}: intra=shm shares host memory and needs gloo with "
                f"CPU tensors, not {self.backend}; use intra=library"
            )
        p = self.world_size
        self.ranks_per_node = min(ranks_per_node or ranks_per_node_from_env() or p, p)
        k, r = self.ranks_per_node, self.rank
        nodes = [self.ranks[i : i + k] for i in range(0, p, k)]  # global ranks, node by node
        self.num_nodes = len(nodes)
        self.node_ranks = nodes[r // k]
        self.leader = self.node_ranks[0]
        self.is_leader = r % k == 0
        leaders = [n[0] for n in nodes]
        self.uniform = p % k == 0  # every node has k ranks: two-level scatter and gather
        # rail l: the ranks of local index l, node by node (rail 0 is the leaders)
        rails = [[n[i] for n in nodes] for i in range(k)] if self.uniform else [leaders]
        # Every rank creates every multi-rank group in the same order (new_group's contract),
        # keeping those it belongs to: its node's and its rail's (for leaders, the leaders').
        self._groups = [
            (g, acquire_group(g, self.backend, self.timeout_s))
            for g in [*nodes, *rails]
            if len(g) > 1
        ]
        mine = {tuple(g): pg for g, (pg, _) in self._groups}
        self.stats.extra.update(num_nodes=self.num_nodes, ranks_per_node=k)
        self.node_group = mine.get(tuple(self.node_ranks))
        self.leader_group = mine.get(tuple(leaders)) if self.is_leader else None
        my_rail = rails[r % k] if self.uniform else []
        self.rail_group = mine.get(tuple(my_rail))
        self.segment = None
        if intra == "shm" and self.node_group is not None:  # only a node's members set it up
            self.segment = shm_segment_for(  # the native path when it is built
                self.node_group, self.backend, chunk_bytes, self.timeout_s, shm_native is not None
            )
        self.stats.extra["shm"] = float(self.segment is not None)

    def wire_bytes(self, nbytes: int) -> int:
        local, n = len(self.node_ranks), self.num_nodes
        if not self.is_leader:
            return nbytes  # one message to the leader (the broadcast is received)
        return (local - 1) * nbytes + 2 * (n - 1) * nbytes // n

    def op_wire_bytes(self, op: str, nbytes: int) -> int:
        if op == "all_reduce" or not self.uniform:
            return super().op_wire_bytes(op, nbytes)
        g, m = self.ranks_per_node, self.num_nodes
        if op == "reduce_scatter":  # the node's ring on n bytes, then the rail's on n / g
            return (g - 1) * nbytes // g + (m - 1) * nbytes // (g * m)
        return (m - 1) * nbytes + (g - 1) * m * nbytes  # the rail's ring, then the node's

    def reduce_scatter_(self, x: Tensor, out: Tensor) -> None:
        if not self.uniform:
            super().reduce_scatter_(x, out)
            return
        g, m = self.ranks_per_node, self.num_nodes
        q = x.numel() // self.world_size
        # (g, m, q): block l holds the parts of the ranks of local index l, node by node
        mixed = x.view(m, g, q).transpose(0, 1).contiguous().view(-1)
        node_sum = x.new_empty(m * q)
        self._scatter(node_sum, mixed, self.node_group)
        self._scatter(out.view(-1), node_sum, self.rail_group)

    def all_gather_(self, x: Tensor, out: Tensor) -> None:
        if not self.uniform:
            super().all_gather_(x, out)
            return
        g, m, n = self.ranks_per_node, self.num_nodes, x.numel()
        rail = x.new_empty(m * n)
        self._gather(rail, x.view(-1), self.rail_group)
        node = x.new_empty(g * m * n)  # (g, m, n): block l is rail l's gather
        self._gather(node, rail, self.node_group)
        out.view(m, g, n).copy_(node.view(g, m, n).transpose(0, 1))

    def _scatter(self, out: Tensor, x: Tensor, group: Any) -> None:
        if group is None:  # a group of one: the part is the whole
            out.copy_(x)
        else:
            self.library(library_reduce_scatter, out, x, group=group)

    def _gather(self, out: Tensor, x: Tensor, group: Any) -> None:
        if group is None:
            out.copy_(x)
        else:
            self.library(library_all_gather, out, x, group=group)

    def reduce_(self, x: Tensor) -> None:
        if self.segment is not None:
            self.segment.all_reduce_(x, self.deadline)  # every node rank holds the node sum
            if self.leader_group is not None:
                self.library(dist.all_reduce, x, group=self.leader_group)
            if self.num_nodes > 1:  # the leader is group rank 0
                self.segment.broadcast_(x, root=0, deadline=self.deadline)
            return
        if self.node_group is not None:
            self.library(dist.reduce, x, self.leader, group=self.node_group)
        if self.leader_group is not None:
            self.library(dist.all_reduce, x, group=self.leader_group)
        if self.node_group is not None:
            self.library(dist.broadcast, x, self.leader, group=self.node_group)

    def _release(self) -> None:
        super()._release()
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        for ranks, (g, generation) in self._groups:
            release_group(ranks, self.backend, self.timeout_s, g, generation)
        self._groups = []
        self.node_group = self.leader_group = self.rail_group = None
