"""A shared-memory all-reduce for ranks on one host: the transport under the ``shm`` strategy.

gloo sends every collective through loopback TCP, about 0.5 ms per message on a small VM, while
two processes that poll a flag in shared memory see each other in about a microsecond. Tensor-
parallel decode sends only small messages, so on a CPU host the transport, not the bytes, sets
the pace (vLLM's CPU backend and DeepSpeed's shm all-reduce make the same observation).

One segment per communicator, mapped by every rank of the group::

    flags   2 x p counters, one 64-byte line each (no false sharing): "arrived", "reduced"
    pids    p process ids (a waiter tells a dead peer from a slow one)
    data    p slots of ``capacity`` bytes: each rank's input chunk
    result  ``capacity`` bytes: the reduced chunk

Per chunk of at most ``capacity`` bytes: each rank copies its chunk into its slot and raises
its "arrived" counter to the round number; when every rank has arrived, rank r sums slice r of
every slot in rank order (slot 0 + slot 1 + ...) into the result (a reduce-scatter done by all
ranks in parallel), raises "reduced", and when every rank has reduced, each copies the whole
result out (the all-gather). Counters only grow, so no reset is needed and the round number
says which chunk a peer is on. The next round's writes are safe without more barriers: a rank
writes its slot only after every rank finished reducing (the "reduced" barrier) and writes the
result only after every rank arrived again, i.e. finished copying the previous result out.
Each result element is computed once, so every rank receives the same bits. Messages larger
than one chunk are bandwidth-bound and take ``_round_large``, which moves about a quarter fewer
bytes (only the slices other ranks reduce are copied in; a rank reads its own term from its
input), summing in the same rank order, so results do not depend on ``chunk_bytes``. With each
arrival a rank publishes (op, dtype, element count) beside its counter and every rank compares
them after the barrier: ranks that disagree get a ``CommError`` naming what each one sent,
never a silent wrong sum. A one-chunk message, the decode case, reuses views cached per
(dtype, shape): on this VM every tensor slice costs microseconds, as much as the whole exchange.

Memory ordering: a counter is raised by a plain 8-byte store after the data stores, and read by
a plain load before the data loads (through a ``memoryview`` of the mapping: about 50 ns per
access from Python, where a numpy or torch element access costs microseconds). That is enough
on x86-64 (total store order; aligned 8-byte accesses are atomic) and the transport refuses
other architectures rather than risk torn reads.

Waiting: spin on the counters for a few microseconds; then look where the awaited peer runs
(the thread that runs the peer's collective, which each rank publishes beside its counter:
``/proc/<pid>/task/<tid>/stat``, one ``pread``). If it is queued on this rank's own CPU (more
ranks than free cores: world size 4 on 2 cores, or a busy neighbour), yield to it at once;
otherwise it runs elsewhere, so spin up to 1 ms and then sleep in 50 us steps. Yielding early
to a peer that does not share the CPU would hand the CPU to whatever else is queued there (a
busy background process) for a whole time slice: that was the old policy's loss under load. A
waiter checks the time and its peers' pids every few milliseconds: a dead (or zombie) peer or
the timeout becomes a ``CommError`` naming the ranks. One clock per operation: each collective
has a deadline, ``timeout_s`` from its start, or the caller's deadline when it is one step of a
larger operation (``twoshot``, ``quantized``, ``hierarchical``).

Lifetime: rank 0 creates the file under ``/dev/shm`` (named after its uid and pid), reserves
its memory (``posix_fallocate``: a full ``/dev/shm`` is an error at set-up on every rank, not a
SIGBUS at first touch), the others
map it, and after a barrier rank 0 unlinks it. From then on the segment has no name: the kernel
frees it when the last rank unmaps it or dies, so nothing is left behind by ``close()``, normal
exit or a crash of any rank. A crash inside the short setup window leaves a named file; an
``atexit`` hook removes it on normal exit, and every new segment first removes this user's
``commlab-shm-<uid>-*`` files whose creating process no longer exists (stale segments from an
earlier crash); other users' files in the shared ``/dev/shm`` are never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import mmap
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from framework.comm.communicator import CommError
from framework.comm.reduction import sum_rank_order

NATIVE_MISSING = (
    "the native shm extension (framework/comm/_shm_native.c) is not built; reinstall commlab "
    "on a host with a C compiler"
)
try:  # the hot path in C, built by pip when a compiler is there (setup.py; optional)
    from framework.comm import _shm_native as shm_native
except ImportError as e:  # pragma: no cover - depends on the install
    shm_native = None
    NATIVE_MISSING += f" ({e})"
IMPLS = ("auto", "native", "python")

SHM_DIR = Path("/dev/shm")
PREFIX = "commlab-shm-"
_LINE = 64  # bytes per counter: one cache line
_STRIDE = _LINE // 8  # int64 slots per counter
_ARRIVED, _REDUCED = 0, 1
_SPINS = 64  # polls before the slow wait (it costs a /proc read)
_SPIN_S = 1e-3  # a peer running on another CPU: spin this long, then sleep
_SLEEP_S = 50e-6  # sleep step after that
_WHERE_S = 200e-6  # how often a waiter re-reads which CPU its peer last ran on
_CHECK_S = 5e-3  # how often a waiter checks the clock and its peers' pids
_created: set[Path] = set()  # named files this process created and has not unlinked yet


def _libc_sched_getcpu():
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


_sched_getcpu = _libc_sched_getcpu()  # the CPU this thread runs on (vDSO: ~0.1 us)


def _stat_fields(raw: bytes) -> list[bytes]:
    """Fields 3 onwards of ``/proc/<pid>[/task/<tid>]/stat`` (the name in field 2 may hold
    spaces and parentheses, so split after its last ``)``): [0] is the state, [36] the CPU."""
    return raw.rsplit(b")", 1)[-1].split()


def queued_on_this_cpu(stat_fd: int) -> bool:
    """Whether the thread whose ``/proc/.../stat`` is open as ``stat_fd`` is runnable and last
    ran on the CPU the calling thread runs on: then it waits for this very CPU. One ``pread``
    (a few microseconds); False when it cannot tell."""
    if stat_fd < 0 or _sched_getcpu is None:
        return False
    try:
        fields = _stat_fields(os.pread(stat_fd, 1024, 0))
    except OSError:
        return False
    return fields[0] == b"R" and int(fields[36]) == _sched_getcpu()


_OP_ALL_REDUCE, _OP_BROADCAST, _OP_REDUCE_SCATTER, _OP_ALL_GATHER, _OP_ONESHOT = 1, 2, 3, 4, 5
_OP_NAMES = {
    _OP_ALL_REDUCE: "all_reduce",
    _OP_BROADCAST: "broadcast",
    _OP_REDUCE_SCATTER: "reduce_scatter",
    _OP_ALL_GATHER: "all_gather",
    _OP_ONESHOT: "one-shot all_reduce",
}
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
_DTYPE_CODE = {dt: i + 1 for i, dt in enumerate(_DTYPES)}


def _fingerprint(op: int, x: Tensor, root: int = 0) -> int:
    """(op, root, dtype, element count) in one int64, published with each round; the low 8
    bits are left for the round number (:meth:`ShmSegment._arrive` adds it)."""
    return _fingerprint_of(op, x.dtype, x.numel(), root)


@functools.lru_cache(maxsize=512)
def _fingerprint_of(op: int, dtype: torch.dtype, numel: int, root: int) -> int:
    code = _DTYPE_CODE.get(dtype, 0)
    return (op << 60) | ((root & 0x3F) << 54) | (code << 48) | ((numel & (2**40 - 1)) << 8)


def _describe(fp: int) -> str:
    op, root, code = (fp >> 60) & 0x7, (fp >> 54) & 0x3F, (fp >> 48) & 0x3F
    numel = (fp >> 8) & (2**40 - 1)
    dtype = str(_DTYPES[code - 1]).removeprefix("torch.") if code else "?"
    what = _OP_NAMES.get(op, f"op {op}") + (f" from rank {root}" if op == _OP_BROADCAST else "")
    return f"{what} of {numel} {dtype}"


def shm_supported() -> str | None:
    """``None`` when this host can run the transport, else why not."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"needs x86-64 memory ordering, this host is {platform.machine()}"
    if not SHM_DIR.is_dir():
        return f"{SHM_DIR} does not exist"
    return None


def host_id() -> str:
    """Same value for processes that can share memory (same kernel boot)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def segment_name(pid: int | None = None) -> str:
    """``commlab-shm-<uid>-<pid>-<random>``: whose it is, and which process made it."""
    pid = os.getpid() if pid is None else pid
    return f"{PREFIX}{os.getuid()}-{pid}-{uuid.uuid4().hex[:12]}"


def remove_stale_segments(directory: Path = SHM_DIR) -> list[Path]:
    """Unlink this user's segment files whose creating process is gone; return them.

    ``/dev/shm`` is shared by every user of the host (and sticky): another user's files are
    never touched, and a file that vanishes or cannot be removed meanwhile is skipped."""
    removed = []
    uid = os.getuid()
    for path in directory.glob(f"{PREFIX}{uid}-*"):
        try:
            pid = int(path.name[len(f"{PREFIX}{uid}-") :].split("-")[0])
            if path.stat().st_uid != uid or _alive(pid):
                continue
            path.unlink()
        except (ValueError, OSError):
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) or a pid that is gone is
    dead: it will never raise a counter again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        state = _stat_fields(Path(f"/proc/{pid}/stat").read_bytes())[0]
    except OSError:  # no /proc (or it just exited): trust kill()
        return True
    return state not in (b"Z", b"X")


@atexit.register
def _unlink_created() -> None:
    for path in list(_created):
        path.unlink(missing_ok=True)
        _created.discard(path)


class ShmError(CommError):
    """A peer died, timed out or the segment is unusable; the message names the ranks."""


def _create(size: int, capacity: int, p: int) -> str:
    """Rank 0: make the segment file and reserve its memory; its path, or ``error:why``.

    ``ftruncate`` alone makes a sparse file: on a ``/dev/shm`` smaller than the segment
    (containers default to 64 MiB) every rank would die of SIGBUS on first touch. Reserving
    the pages now turns that into an error at set-up, on every rank, naming the fix."""
    remove_stale_segments()
    path = SHM_DIR / segment_name()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as e:
        return f"error:cannot create {path}: {e}"
    _created.add(path)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        path.unlink(missing_ok=True)
        _created.discard(path)
        free = _free_bytes(SHM_DIR)
        return (
            f"error:the shared-memory segment needs {size} bytes ({p + 1} x chunk_bytes="
            f"{capacity} plus flags) but {SHM_DIR} has {free} bytes free ({e.strerror}); "
            f"lower strategy.chunk_bytes, enlarge {SHM_DIR} (docker --shm-size), or use "
            f"the library all-reduce (strategy=naive)"
        )
    finally:
        os.close(fd)
    return str(path)


def _free_bytes(directory: Path) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class ShmSegment:
    """Shared memory over the ranks of ``group`` (all on this host); see the module docstring.

    Collective over ``group``: every member constructs it at the same point. ``capacity``
    bytes per rank bound the segment at (p + 1) * capacity; larger messages go in chunks.
    """

    def __init__(
        self, group: dist.ProcessGroup, capacity: int, timeout_s: float, native: bool = False
    ) -> None:
        why = shm_supported()
        if why is not None:
            raise ShmError(f"shared-memory transport unavailable: {why}")
        self.rank = dist.get_rank(group)
        self.world_size = p = dist.get_world_size(group)
        self.capacity = capacity = max(_LINE, -(-capacity // _LINE) * _LINE)
        self.timeout_s = timeout_s
        self._round = 0
        self._unsettled: int | None = None  # a one-shot round whose second barrier is pending
        self._deadline = 0.0  # when the collective in progress must be done (monotonic)
        self._broken: str | None = None
        head = 2 * p * _LINE + -(-8 * p // _LINE) * _LINE
        size = head + (p + 1) * capacity
        name: list = [None]
        if self.rank == 0:
            name = [_create(size, capacity, p)]
        root = dist.get_global_rank(group, 0)
        dist.broadcast_object_list(name, src=root, group=group)
        if name[0].startswith("error:"):  # every rank refuses alike, before anyone maps it
            raise ShmError(f"rank {self.rank}: {name[0][len('error:') :]}")
        path = Path(name[0])
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        dist.barrier(group=group)  # every rank has mapped it: the name is no longer needed
        if self.rank == 0:
            path.unlink(missing_ok=True)
            _created.discard(path)
        self.path = path
        # int64 counters read and written through a memoryview: ~50 ns an access from Python
        self._flags = memoryview(self._mm).cast("q")
        self._pids_at = 2 * p * _LINE // 8
        self._flags[self._pids_at + self.rank] = os.getpid()
        self._tid = self._flags[self._flag(_ARRIVED, self.rank) + 2] = threading.get_native_id()
        self._plans: dict[tuple, tuple] = {}
        self._stat_fds: dict[tuple, int] = {}  # (peer, its thread) -> open /proc/.../stat
        self._data = torch.frombuffer(
            self._mm, dtype=torch.uint8, offset=head, count=(p + 1) * capacity
        )
        self._native = None  # the C module's handle on this segment (same layout, same rounds)
        if native:
            if shm_native is None:
                raise ShmError(NATIVE_MISSING)
            base = self._data.data_ptr() - head
            self._native = shm_native.open(
                base + head, base, base + 8 * self._pids_at, p, self.rank, capacity
            )
        dist.barrier(group=group)  # pids are written

    # -- collectives ------------------------------------------------------------------------
    def all_reduce_(self, x: Tensor, deadline: float | None = None) -> None:
        """Sum ``x`` (contiguous, CPU) in place over the group.

        ``deadline`` (``time.monotonic()``) is when the caller's operation must be done: a
        step of a larger operation (``hierarchical``'s three steps, ``twoshot``'s two) runs on
        what is left of that operation's clock; None gives this call ``timeout_s`` of its own.
        Every collective method takes it."""
        self._check()
        if self.world_size == 1:
            return
        self._begin(deadline)
        fp = _fingerprint(_OP_ALL_REDUCE, x)
        if self._native is not None and self._native_takes(x):
            self._run_native(_OP_ALL_REDUCE, x, x, fp)
            return
        self._settle()
        plan = self._plan(x)
        if plan is not None:  # fits in one chunk: the hot path of TP decode, views cached
            mine, parts, out, result = plan
            self._round1(x, mine, parts, out, result, fp)
            return
        flat = x.view(-1)
        for lo in range(0, flat.numel(), self.capacity // x.element_size()):
            seg = flat[lo : lo + self.capacity // x.element_size()]
            self._round_large(seg, *self._views(seg.dtype, seg.numel()), fp)

    def all_reduce_oneshot_(self, x: Tensor, deadline: float | None = None) -> None:
        """Sum ``x`` in place in one stage and one barrier: every rank copies its input into
        its slot and, once every rank has arrived, sums every slot itself, in rank order (the
        same order, hence the same bits, as :meth:`all_reduce_`).

        No second barrier: consecutive one-shot rounds alternate between the two halves of
        each slot, and a rank writes a half only after every rank arrived at the round before,
        i.e. finished reading that half two rounds ago. Any other collective first completes
        the skipped barrier (:meth:`_settle`). p times the reads of two-shot's slices: the
        faster only for small messages."""
        self._check()
        p = self.world_size
        if p == 1:
            return
        self._begin(deadline)
        fp = _fingerprint(_OP_ONESHOT, x)
        if self._native is not None and self._native_takes(x):
            self._run_native(_OP_ONESHOT, x, x, fp)
            return
        half = self.capacity // 2 // x.element_size()
        flat = x.view(-1)
        for lo in range(0, flat.numel(), half):
            c = min(half, flat.numel() - lo)
            g = self._round = self._round + 1
            mine, slots = self._oneshot_views(x.dtype, c, g % 2)
            seg = flat[lo : lo + c]
            mine.copy_(seg)
            self._arrive(_ARRIVED, g, fp=fp)
            sum_rank_order(slots, seg)  # this rank's slot holds its own copy
            self._unsettled = g

    def _oneshot_views(self, dtype: torch.dtype, m: int, parity: int) -> tuple:
        """(my slot's half, every slot's half) of ``m`` elements, cached: slicing costs
        microseconds on a small VM, as much as the exchange itself."""
        key = ("oneshot", dtype, m, parity)
        views = self._plans.get(key)
        if views is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            p = self.world_size
            cap = self.capacity // torch.empty((), dtype=dtype).element_size()
            lo = parity * (cap // 2)
            slots = self._data.view(dtype).view(p + 1, cap)[:p, lo : lo + m]
            views = self._plans[key] = (slots[self.rank], list(slots))
        return views

    def _settle(self) -> None:
        """Complete the barrier the last one-shot round skipped: every rank has read every
        slot, so any collective may overwrite them."""
        if self._unsettled is not None:
            g, self._unsettled = self._unsettled, None
            self._arrive(_REDUCED, g)

    def reduce_scatter_(self, x: Tensor, out: Tensor, deadline: float | None = None) -> None:
        """This rank's part (rows ``[r n/p, (r+1) n/p)`` of dim 0) of the sum of ``x`` into
        ``out``: each rank copies in, then sums only its own part of every slot, in rank
        order. Large messages go in rounds of ``capacity / p`` columns of every part."""
        self._check()
        p, r = self.world_size, self.rank
        if p == 1:
            out.copy_(x.view_as(out))
            return
        self._begin(deadline)
        fp = _fingerprint(_OP_REDUCE_SCATTER, x)
        if self._native is not None and self._native_takes(x, out):
            self._run_native(_OP_REDUCE_SCATTER, x, out, fp)
            return
        self._settle()
        q = x.numel() // p
        parts, mine = x.view(p, q), out.view(-1)
        cap = self.capacity // x.element_size()
        slots = self._data.view(x.dtype).view(p + 1, cap)
        width = max(1, cap // p)
        for lo in range(0, q, width):
            c = min(width, q - lo)
            g = self._round = self._round + 1
            slots[r, : p * c].view(p, c).copy_(parts[:, lo : lo + c])
            self._arrive(_ARRIVED, g, fp=fp)
            sum_rank_order([slots[j, r * c : (r + 1) * c] for j in range(p)], mine[lo : lo + c])
            self._arrive(_REDUCED, g)

    def all_gather_(self, x: Tensor, out: Tensor, deadline: float | None = None) -> None:
        """Every rank's ``x`` into ``out`` in rank order: copy in, one barrier, copy every
        slot out (in rounds of ``capacity`` bytes for large messages)."""
        self._check()
        p, r = self.world_size, self.rank
        flat = x.view(-1)
        n = flat.numel()
        if p == 1:
            out.view(-1).copy_(flat)
            return
        self._begin(deadline)
        fp = _fingerprint(_OP_ALL_GATHER, x)
        if self._native is not None and self._native_takes(x, out):
            self._run_native(_OP_ALL_GATHER, x, out, fp)
            return
        self._settle()
        blocks = out.view(p, n)
        cap = self.capacity // x.element_size()
        slots = self._data.view(x.dtype).view(p + 1, cap)
        for lo in range(0, n, cap):
            c = min(cap, n - lo)
            g = self._round = self._round + 1
            slots[r, :c].copy_(flat[lo : lo + c])
            self._arrive(_ARRIVED, g, fp=fp)
            blocks[:, lo : lo + c].copy_(slots[:p, :c])
            self._arrive(_REDUCED, g)

    def add_norm_fits(self, x: Tensor) -> bool:
        """Whether :meth:`all_reduce_add_norm_` takes ``x``: at least p rows (the last dim),
        its sum and norm in one slot."""
        p = self.world_size
        return p == 1 or (x.numel() // x.shape[-1] >= p and 2 * x.nbytes <= self.capacity)

    def fits_one_slot(self, x: Tensor) -> bool:
        """Whether ``x`` goes in one round (:meth:`all_gather_each_`)."""
        return self.world_size == 1 or x.nbytes <= self.capacity

    def all_reduce_add_norm_(
        self,
        x: Tensor,
        residual: Tensor,
        norm: Callable[[Tensor], Tensor],
        out: Tensor,
        normed: Tensor,
        deadline: float | None = None,
    ) -> None:
        """The end of a TP layer in one two-shot round: ``out = residual + sum of x`` over the
        group and ``normed = norm(out)`` row by row (rows: the last dim), the epilogue inside
        the reduction. Rank r reduces its rows, adds its rows of the residual (the same on
        every rank), norms them while they are in its cache and publishes both results; every
        rank copies both out. Each rank adds and norms 1/p of the rows, and nobody makes a
        separate pass over the whole sum. The same bits as the composition: the add commutes
        exactly and a row's norm does not depend on the others. Only for ``x`` that
        :meth:`add_norm_fits`."""
        self._check()
        p, r = self.world_size, self.rank
        d = x.shape[-1]
        m, rows = x.numel(), x.numel() // d
        if p == 1:
            torch.add(residual, x, out=out)
            normed.copy_(norm(out))
            return
        self._begin(deadline)
        self._settle()
        fp = _fingerprint(_OP_ALL_REDUCE, x)
        slots = self._data.view(x.dtype).view(p + 1, self.capacity // x.element_size())
        g = self._round = self._round + 1
        slots[r, :m].copy_(x.view(-1))
        self._arrive(_ARRIVED, g, fp=fp)
        a, b = rows * r // p * d, rows * (r + 1) // p * d
        mine = slots[p, a:b]  # my rows of the new residual, in the result area
        sum_rank_order([slots[j, a:b] for j in range(p)], mine)
        mine.add_(residual.view(-1)[a:b])
        slots[p, m + a : m + b].copy_(norm(mine.view(-1, d)).view(-1))
        self._arrive(_REDUCED, g)
        out.view(-1).copy_(slots[p, :m])
        normed.view(-1).copy_(slots[p, m : 2 * m])

    def all_gather_each_(
        self, x: Tensor, out: Tensor, arrived: Callable[[int], None], deadline: float | None = None
    ) -> None:
        """:meth:`all_gather_` that calls ``arrived(j)`` as soon as rank j's block of ``out``
        is filled, in ring order from this rank's own (which needs no wait): the caller works
        on each block while later ones are still being written (``shm``'s
        ``all_gather_matmul``). Only for ``x`` that :meth:`fits_one_slot`."""
        self._check()
        p, r = self.world_size, self.rank
        flat = x.view(-1)
        n = flat.numel()
        blocks = out.view(p, n)
        blocks[r].copy_(flat)
        if p == 1:
            arrived(r)
            return
        self._begin(deadline)
        self._settle()
        slots = self._data.view(x.dtype).view(p + 1, self.capacity // x.element_size())
        g = self._round = self._round + 1
        slots[r, :n].copy_(flat)
        fp = _fingerprint(_OP_ALL_GATHER, x)
        self._arrive(_ARRIVED, g, only=r, fp=fp)  # publish; wait for nobody yet
        arrived(r)
        tag = self._flags[self._flag(_ARRIVED, r) + 1]
        for k in range(1, p):
            j = (r + k) % p
            self._arrive(_ARRIVED, g, only=j)
            theirs = self._flags[self._flag(_ARRIVED, j) + 1]
            if theirs != tag:
                self._broken = (
                    f"ranks disagree on the collective of round {g}: rank {r}: "
                    f"{_describe(tag)}; rank {j}: {_describe(theirs)}"
                )
                raise ShmError(f"rank {r}: {self._broken}")
            blocks[j].copy_(slots[j, :n])
            arrived(j)
        self._arrive(_REDUCED, g)

    def _round1(
        self, x: Tensor, mine: Tensor, parts: list[Tensor], out: Tensor, result: Tensor, fp: int
    ) -> None:
        g = self._round = self._round + 1
        mine.copy_(x)
        self._arrive(_ARRIVED, g, fp=fp)
        if parts:
            sum_rank_order(parts, out)
        self._arrive(_REDUCED, g)
        x.copy_(result)

    def _round_large(
        self, x: Tensor, mine: Tensor, parts: list[Tensor], out: Tensor, result: Tensor, fp: int
    ) -> None:
        """One chunk of a large message, with a quarter less memory traffic than ``_round1``.

        Only the slices the other ranks reduce are copied in; this rank reads its own term of
        its slice straight from ``x``, sums the terms in rank order (the same order, hence the
        same bits, as ``_round1``: results do not depend on ``chunk_bytes``), and copies back
        only the other slices. Worth the extra calls only when bandwidth, not per-call
        overhead, sets the time."""
        p, r, m = self.world_size, self.rank, x.numel()
        a, b = m * r // p, m * (r + 1) // p
        g = self._round = self._round + 1
        mine[:a].copy_(x[:a])
        mine[b:].copy_(x[b:])
        self._arrive(_ARRIVED, g, fp=fp)
        own = x[a:b]
        if parts:
            sum_rank_order([own if j == r else part for j, part in enumerate(parts)], out)
            own.copy_(out)
        self._arrive(_REDUCED, g)
        x[:a].copy_(result[:a])
        x[b:].copy_(result[b:])

    def _plan(self, x: Tensor) -> tuple | None:
        """Cached views for a one-chunk message of ``x``'s dtype and shape (None if larger)."""
        key = (x.dtype, x.shape)
        plan = self._plans.get(key)
        if plan is None:
            if x.numel() * x.element_size() > self.capacity:
                return None
            if len(self._plans) >= 64:  # bounded: a long run with many shapes stays flat
                self._plans.clear()
            mine, parts, out, result = self._views(x.dtype, x.numel())
            plan = self._plans[key] = (mine.view(x.shape), parts, out, result.view(x.shape))
        self._check()
        return plan

    def _views(self, dtype: torch.dtype, m: int) -> tuple:
        """(my slot, every slot's slice of mine, my slice of the result, the result)."""
        self._check()
        p, r = self.world_size, self.rank
        cap = self.capacity // torch.empty((), dtype=dtype).element_size()
        slots = self._data.view(dtype).view(p + 1, cap)
        a, b = m * r // p, m * (r + 1) // p
        parts = [slots[j, a:b] for j in range(p)] if b > a else []
        return slots[r, :m], parts, slots[p, a:b], slots[p, :m]

    def broadcast_(self, x: Tensor, root: int, deadline: float | None = None) -> None:
        """Copy ``x`` of group rank ``root`` into ``x`` of every rank (``deadline``: as above)."""
        self._check()
        p = self.world_size
        if p == 1:
            return
        self._begin(deadline)
        self._settle()
        fp = _fingerprint(_OP_BROADCAST, x, root)
        flat = x.view(-1)
        cap = self.capacity // x.element_size()
        result = self._data.view(x.dtype).view(p + 1, cap)[p]
        for lo in range(0, flat.numel(), cap):
            m = min(cap, flat.numel() - lo)
            g = self._round = self._round + 1
            # "arrived" doubles as "done reading the previous result": then root may write it
            self._arrive(_ARRIVED, g, fp=fp)
            if self.rank == root:
                result[:m].copy_(flat[lo : lo + m])
            self._arrive(_REDUCED, g, only=root)
            if self.rank != root:
                flat[lo : lo + m].copy_(result[:m])
        # nobody may overwrite the result until every rank copied it: the next round's
        # "arrived" barrier guarantees that

    def close(self) -> None:
        """Unmap. Safe to call twice; the segment disappears when the last rank unmaps it."""
        if self._mm is None:
            return
        self._native = None  # points into the mapping: dropped before it goes
        self._plans.clear()
        self._close_stat_fds()
        self._data = None
        self._flags.release()
        with contextlib.suppress(BufferError):  # a view is still held: the GC unmaps it later
            self._mm.close()
        self._mm = None

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _native_takes(x: Tensor, out: Tensor | None = None) -> bool:
        """Whether the C path runs this call: contiguous tensors of a dtype it sums."""
        return x.dtype in _DTYPE_CODE and x.is_contiguous() and (out is None or out.is_contiguous())

    def _run_native(self, op: int, x: Tensor, out: Tensor, fp: int) -> None:
        """One collective in C, GIL released: the same rounds, counters and bits as the
        Python path, so the two may alternate on one segment (the fused ops stay Python)."""
        try:
            self._round, unsettled = shm_native.run(
                self._native,
                op,
                x.data_ptr(),
                out.data_ptr(),
                x.numel(),
                _DTYPE_CODE[x.dtype],
                fp,
                self._round,
                self._unsettled or 0,
                self._deadline,
            )
        except shm_native.ShmNativeError as e:
            self._native_failed(*e.args)
        self._unsettled = unsettled or None

    def _native_failed(self, kind: str, phase: int, g: int) -> None:
        """Word the C path's failure as the Python path does, from the segment's state."""
        if kind == "disagree":
            seen = [self._flags[self._flag(phase, j) + 1] for j in range(self.world_size)]
            desc = "; ".join(f"rank {j}: {_describe(f)}" for j, f in enumerate(seen))
            self._broken = f"ranks disagree on the collective of round {g}: {desc}"
        else:
            self._check_peers(phase, g)  # raises, naming the dead or late ranks
            self._broken = f"{kind} at round {g}"  # the late rank arrived since
        raise ShmError(f"rank {self.rank}: {self._broken}")

    def _check(self) -> None:
        if self._broken is not None:
            raise ShmError(f"shared-memory segment unusable after an earlier error: {self._broken}")
        if self._mm is None:
            raise ShmError("shared-memory segment used after close()")

    def _flag(self, phase: int, j: int) -> int:
        return (phase * self.world_size + j) * _STRIDE

    def _arrive(self, phase: int, g: int, only: int | None = None, fp: int = 0) -> None:
        """Raise my ``phase`` counter to ``g``; wait until every rank's (or ``only``'s) is.

        With ``fp`` (arrival only) each rank publishes what it is about to do (op, dtype,
        element count) beside its counter, and after the barrier every rank compares them:
        a desynchronised program is an error on every rank, never a silent wrong sum."""
        flags = self._flags
        me = self._flag(phase, self.rank)
        if fp:
            fp |= g & 0xFF
            flags[me + 1] = fp  # before the counter: a peer that sees g sees this too
        flags[me] = g
        for j in range(self.world_size) if only is None else (only,):
            i = self._flag(phase, j)
            if flags[i] >= g:
                continue
            for _ in range(_SPINS):
                if flags[i] >= g:
                    break
            else:
                self._wait_slow(phase, j, i, g)
        if fp:
            # A peer whose tag is already the next round's (a broadcast root does not wait
            # for the others) has moved on after checking this round itself: skip it.
            seen = [flags[self._flag(phase, j) + 1] for j in range(self.world_size)]
            if any(f != fp and (f & 0xFF) == (g & 0xFF) for f in seen):
                desc = "; ".join(f"rank {j}: {_describe(f)}" for j, f in enumerate(seen))
                self._broken = f"ranks disagree on the collective of round {g}: {desc}"
                raise ShmError(f"rank {self.rank}: {self._broken}")

    def _wait_slow(self, phase: int, j: int, i: int, g: int) -> None:
        """Wait until rank ``j``'s counter reaches ``g``, without taking the CPU it needs.

        If ``j`` last ran on this rank's CPU it is queued behind this rank (more ranks than
        free cores, or a busy neighbour): yield to it at once. Otherwise it runs elsewhere and
        arrives soon: spin up to ``_SPIN_S`` (a yield here would hand this CPU to whatever
        else is queued on it, for a whole time slice), then sleep in short steps. Where the
        peer runs is re-read every ``_WHERE_S``. One clock per operation, not per peer, phase
        or stall: a collective fails within ``_CHECK_S`` + one sleep step of its deadline."""
        flags = self._flags
        t0 = last = where = time.perf_counter()
        queued = self._queued_behind_me(j)
        while flags[i] < g:
            now = time.perf_counter()
            if now - where >= _WHERE_S:
                where = now
                queued = self._queued_behind_me(j)
            if queued:
                os.sched_yield()
            elif now - t0 >= _SPIN_S:
                time.sleep(_SLEEP_S)
            if now - last >= _CHECK_S:
                last = now
                self._check_peers(phase, g)

    def _begin(self, deadline: float | None) -> None:
        """Start a collective (or a step of the caller's): set its deadline, and publish which
        thread of this process runs it (a schedule's progress thread, or the caller's)."""
        self._deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        tid = threading.get_native_id()
        if tid != self._tid:
            self._tid = self._flags[self._flag(_ARRIVED, self.rank) + 2] = tid

    def _queued_behind_me(self, j: int) -> bool:
        """Whether rank ``j``'s collective thread waits to run on this thread's CPU."""
        key = (j, self._flags[self._flag(_ARRIVED, j) + 2])
        fd = self._stat_fds.get(key)
        if fd is None:
            if len(self._stat_fds) > 4 * self.world_size:  # threads come and go: stay bounded
                self._close_stat_fds()
            pid = self._flags[self._pids_at + j]
            try:
                fd = os.open(f"/proc/{pid}/task/{key[1]}/stat", os.O_RDONLY)
            except OSError:
                fd = -1
            self._stat_fds[key] = fd
        return queued_on_this_cpu(fd)

    def _close_stat_fds(self) -> None:
        for fd in self._stat_fds.values():
            if fd >= 0:
                os.close(fd)
        self._stat_fds.clear()

    def _check_peers(self, phase: int, g: int) -> None:
        """Raise if a rank we wait for died, or the operation's deadline passed with a rank
        still behind (a rank that arrived meanwhile is no reason to fail)."""
        flags = [self._flags[self._flag(phase, j)] for j in range(self.world_size)]
        behind = [j for j in range(self.world_size) if flags[j] < g]
        if not behind:
            return
        pids = [self._flags[self._pids_at + j] for j in range(self.world_size)]
        dead = [j for j in behind if not _alive(pids[j])]
        what = "arrived" if phase == _ARRIVED else "reduced"
        if dead:
            self._broken = (
                f"rank(s) {dead} (pid {[pids[j] for j in dead]}) died before round {g} ({what})"
            )
        elif time.monotonic() > self._deadline:
            waited = time.monotonic() - self._deadline + self.timeout_s
            self._broken = (
                f"timed out after {waited:.1f} s (timeout_s={self.timeout_s}) waiting for "
                f"rank(s) {behind} to reach round {g} ({what}); they are at "
                f"{[flags[j] for j in behind]}"
            )
        if self._broken is not None:
            raise ShmError(f"rank {self.rank}: {self._broken}")


def shm_segment_for(
    group, backend: str, chunk_bytes: int, timeout_s: float, native: bool = False
) -> ShmSegment | None:
    """A segment over ``group`` if all its ranks share this host's memory, else ``None``.

    Collective over ``group``. The decision is taken from every rank's answer, so all ranks
    agree on it.
    """
    ok = backend == "gloo" and shm_supported() is None
    mine = (host_id() if ok else "", ok)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if not all(ok_j and h == everyone[0][0] for h, ok_j in everyone):
        return None
    return ShmSegment(group, chunk_bytes, timeout_s, native)


def round_trip_s(group, repeats: int = 5, iters: int = 20000) -> float | None:
    """Seconds per cache-line round trip between ranks 0 and 1 of ``group`` (the median of
    ``repeats`` runs of ``iters``): the floor under any exchange through shared memory. Each
    of the two bounces a counter through its own line of a fresh segment, in native code (in
    Python, the interpreter would be what is measured). None with one rank, ranks on several
    hosts, or no native extension. Collective over ``group``."""
    ok = shm_native is not None and dist.get_world_size(group) > 1
    seg = shm_segment_for(group, dist.get_backend(group), 4096, 30.0, native=True) if ok else None
    if seg is None:
        return None
    try:
        times = []
        for k in range(repeats):
            dist.barrier(group=group)
            deadline = time.monotonic() + 30.0
            times.append(shm_native.round_trip(seg._native, k * iters, iters, deadline))
    finally:
        seg.close()
    mine = [sorted(times)[len(times) // 2]]  # rank 0's figure, on every rank
    dist.broadcast_object_list(mine, src=dist.get_global_rank(group, 0), group=group)
    return mine[0]
