"""The counters every communicator keeps (``comm.stats``), identical across strategies so that
measurements compare: calls, collectives, bytes, wire bytes and exposed wait, per op."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from framework.comm.fused import FUSED_OPS

# The ops of the interface, in the order the counters list them: the three collectives, then
# the fused ops (a collective with its compute, framework.comm.fused).
OPS = ("all_reduce", "reduce_scatter", "all_gather", *FUSED_OPS)
OP_COUNTERS = ("calls", "collectives", "bytes", "wire_bytes", "wait_s")


@dataclass
class CommStats:
    """Counters a researcher needs to see what a strategy did. Reset with ``reset()``.

    The totals count every op; ``by_op[op]`` holds ``calls``, ``collectives``, ``bytes`` and
    ``wire_bytes`` of each of :data:`OPS` alone (``as_dict`` flattens them as
    ``<op>_<counter>``; an op's ``wait_s`` is the time blocked issuing and waiting its
    handles: time blocked in ``flush()`` or ``close()`` counts in the total ``wait_s`` only).
    ``calls`` logical calls, counted under the op called; ``collectives`` operations put on
    the wire, counted under the collective that went (a fused op's all-reduce counts as an
    ``all_reduce`` collective; bucketing makes it smaller than ``calls``, chunking larger);
    ``compute_s`` seconds the fused ops spent on their own compute (matmuls, add and norm),
    kept out of ``wait_s``; ``bytes`` input bytes; ``wire_bytes`` bytes this
    rank sent according to the algorithm; ``wait_s`` seconds the caller was blocked inside
    ``all_reduce``/``wait``/``flush`` (exposed communication); ``buffer_allocs`` and
    ``buffer_reuses`` count communication buffers created and handed out again; ``extra`` holds
    strategy-specific readings (the adaptive strategy's fitted alpha, beta and threshold).
    """

    calls: int = 0
    collectives: int = 0
    bytes: int = 0
    wire_bytes: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0
    buffer_allocs: int = 0
    buffer_reuses: int = 0
    by_op: dict[str, dict[str, int]] = field(default_factory=lambda: _zero_ops())
    extra: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        for f in fields(self):
            if f.name == "by_op":
                self.by_op = _zero_ops()
            elif f.name != "extra":
                setattr(self, f.name, type(getattr(self, f.name))())

    def count_call(self, op: str, nbytes: int) -> None:
        self.calls += 1
        self.bytes += nbytes
        mine = self.by_op[op]
        mine["calls"] += 1
        mine["bytes"] += nbytes

    def count_collective(self, op: str, wire_bytes: int) -> None:
        self.collectives += 1
        self.wire_bytes += wire_bytes
        mine = self.by_op[op]
        mine["collectives"] += 1
        mine["wire_bytes"] += wire_bytes

    def as_dict(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NESTED}
        for op, counters in self.by_op.items():
            out.update({f"{op}_{k}": v for k, v in counters.items()})
        out.update(self.extra)
        return out


_NESTED = ("by_op", "extra")


def _zero_ops() -> dict[str, dict[str, int]]:
    return {op: dict.fromkeys(OP_COUNTERS, 0) for op in OPS}
