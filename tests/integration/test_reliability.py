"""The edges where a research harness must not break: desynchronised programs, failed waits,
late peers, zombies, other users' files, a small /dev/shm, killed jobs and killed launchers.

Every test here failed before its fix (the issue's reproductions, made deterministic).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, first_only

from framework import (
    Algorithm,
    CommError,
    available_strategies,
    build_communicator,
    register_strategy,
)


class FailsFirst(Algorithm):
    """A test algorithm whose first collective fails (as a lost peer would make it)."""

    def __init__(self, group=None, **common) -> None:
        super().__init__(group, **common)
        self.calls = 0

    def reduce_(self, x: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected wire failure")
        dist.all_reduce(x, group=self.group)


def _failing(name: str = "test_fails_first") -> str:
    """Register the failing algorithm on this rank (pool ranks only: the suite's registry, the
    one the config tests compare with conf/strategy, stays as shipped)."""
    if name not in available_strategies():
        register_strategy(name)(FailsFirst)
    return name


def _built_with_failing(strategy: str, **options):
    """``strategy`` over the failing algorithm; the algorithm is unregistered once built, so a
    pool rank's registry does not offer it to ``auto`` in later tests."""
    from framework.comm import registry

    try:
        return build_communicator(strategy, inner=_failing(), **options)
    finally:
        registry._REGISTRY.pop("test_fails_first", None)


# -- 1. desynchronised programs over shm -------------------------------------------------------
def _shm_desync(via: str, impl: str) -> str:
    opts = {"intra": "shm", "ranks_per_node": 2} if via == "hierarchical" else {"impl": impl}
    comm = build_communicator(via, timeout_s=5, **opts)
    n = 16 if dist.get_rank() == 0 else 32
    try:
        comm.all_reduce(torch.ones(n)).wait()
    except CommError as e:
        return str(e)
    finally:
        comm.close()
    return "no error"


@pytest.mark.parametrize(
    "via, impl", first_only([("shm", "native"), ("shm", "python"), ("hierarchical", "auto")])
)
def test_shm_desync_is_an_error_on_every_rank(pools, via: str, impl: str) -> None:
    errors = pools(2).run(_shm_desync, via, impl)
    for rank, err in enumerate(errors):
        assert "ranks disagree" in err, f"rank {rank}: {err}"
        assert "rank 0: all_reduce of 16 float32" in err and "rank 1: all_reduce of 32" in err


# -- 2, 3. a failed wait is kept; wait after close is refused --------------------------------
def _failed_wait_is_kept() -> dict:
    comm = _built_with_failing("double_buffer", num_buffers=2)
    h = comm.all_reduce(torch.ones(4))
    first = second = ""
    try:
        h.wait()
    except RuntimeError as e:
        first = str(e)
    try:
        h.wait()  # before the fix: None, as if it had succeeded
    except RuntimeError as e:
        second = str(e)
    # the failed buffer slot is free again: reusing it (third call) must work
    sums = [comm.all_reduce(torch.full((4,), float(i))).wait().tolist() for i in (2, 3)]
    comm.close()
    return {"first": first, "second": second, "done": h.done, "sums": sums}


def test_a_failed_wait_raises_again_and_frees_its_slot(pools) -> None:
    got = pools(1).run(_failed_wait_is_kept)[0]
    assert got["first"] == got["second"] == "injected wire failure"
    assert got["done"] and got["sums"] == [[2.0] * 4, [3.0] * 4]


def _failed_bucket() -> list[str]:
    comm = _built_with_failing("bucketed")
    handles = [comm.all_reduce(torch.ones(4)), comm.all_reduce(torch.ones(8))]  # one bucket
    errors = []
    for h in handles:
        try:
            h.wait()
            errors.append("returned a result")
        except RuntimeError as e:
            errors.append(str(e))
    comm.all_reduce(torch.ones(2)).wait()  # the next bucket works (its buffer is a new one)
    comm.close()
    return errors


def test_every_tensor_of_a_failed_bucket_gets_the_failure(pools) -> None:
    assert pools(1).run(_failed_bucket)[0] == ["injected wire failure"] * 2


def _wait_after_close() -> str:
    comm = _built_with_failing("async_overlap")
    comm.all_reduce(torch.ones(4))
    late = comm.all_reduce(torch.ones(8))
    with contextlib.suppress(RuntimeError):
        comm.close()  # completes the first handle, which fails: the second stays pending
    try:
        late.wait()
    except CommError as e:
        return str(e)
    return "no error"


def test_wait_after_close_is_refused(pools) -> None:
    err = pools(1).run(_wait_after_close)[0]
    assert "wait() after close()" in err and "'async_overlap'" in err


# -- 13. overlapping inputs in flight ----------------------------------------------------------
def _overlap(name: str) -> str:
    comm = build_communicator(name)
    x = torch.arange(4.0)
    h = comm.all_reduce(x[0:2])
    try:
        comm.all_reduce(x[1:3])
    except CommError as e:
        return str(e)
    finally:
        h.wait()
        comm.all_reduce(x[1:3]).wait()  # once the first is waited, the memory is free again
        comm.close()
    return "no error"


@pytest.mark.parametrize("name", ["bucketed", "async_overlap", "double_buffer"])
def test_overlapping_inputs_in_flight_are_refused(pools, name: str) -> None:
    assert "overlaps the memory of a collective still in flight" in pools(2).run(_overlap, name)[0]


# -- 6. one timeout, set once, for everything a communicator owns -----------------------------
def _late_peer(impl: str) -> dict:
    opts = {"inner_options": {"impl": impl}}
    comm = build_communicator("async_overlap", inner="shm", timeout_s=1.0, **opts)
    seen = {"inner_timeout": comm.inner.timeout_s, "segment_timeout": comm.inner.segment.timeout_s}
    if dist.get_rank() == 1:
        time.sleep(2.0)  # two timeouts late
    t0 = time.perf_counter()
    try:
        comm.all_reduce(torch.ones(8)).wait()
        seen["error"] = ""
    except CommError as e:
        seen["error"] = str(e)
    seen["elapsed"] = time.perf_counter() - t0
    comm.close()
    return seen


@pytest.mark.parametrize("impl", first_only(["native", "python"]))
def test_a_schedules_timeout_governs_its_shm_segment(pools, impl: str) -> None:
    r0, r1 = pools(2).run(_late_peer, impl)
    assert r0["inner_timeout"] == r0["segment_timeout"] == 1.0
    assert "timed out" in r0["error"] and r0["elapsed"] < 1.8, r0  # 1 s + check interval
    assert r1["error"], "the late rank must fail too, not hang"


# -- 12. the chunked path sums in rank order ---------------------------------------------------
def _chunked_vs_whole(impl: str) -> bool:
    x = torch.randn(3000, generator=torch.Generator().manual_seed(dist.get_rank()))
    out = []
    for chunk in (1 << 20, 1000):
        comm = build_communicator("shm", chunk_bytes=chunk, impl=impl)
        out.append(comm.all_reduce(x.clone()).wait())
        comm.close()
    return torch.equal(out[0], out[1])


@pytest.mark.parametrize("impl", first_only(["native", "python"]))
def test_shm_float_sums_do_not_depend_on_chunk_bytes(pools, impl: str) -> None:
    assert pools(3).run(_chunked_vs_whole, impl) == [True] * 3


# -- 10. a /dev/shm too small for the segment -----------------------------------------------
def _no_space() -> tuple[str, list[str]]:
    from unittest import mock

    import framework.comm.shm as shm

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    patch = mock.patch.object(shm.os, "posix_fallocate", full)
    if dist.get_rank() == 0:  # only the creator reserves; every rank must refuse alike
        patch.start()
    err = "no error"
    try:
        build_communicator("shm", chunk_bytes=1 << 20)
    except CommError as e:
        err = str(e)
    finally:
        if dist.get_rank() == 0:
            patch.stop()
    left = [p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getuid()}-{os.getpid()}-*")]
    return err, left


def test_small_dev_shm_is_an_error_at_setup_on_every_rank(pools) -> None:
    for rank, (err, left) in enumerate(pools(2).run(_no_space)):
        assert "needs 3146" in err and "chunk_bytes" in err and "strategy=naive" in err, (
            f"rank {rank}: {err}"
        )
        assert not left, f"rank {rank} left {left} in /dev/shm"


# -- 7, 9. zombies are dead; other users' stale files are not ours -----------------------------
def proc_stat(path: Path) -> list[str]:
    """Fields 3 onwards of a ``/proc/<pid>/stat`` file: [0] state, [1] ppid, [11] utime."""
    return path.read_text().rsplit(")", 1)[-1].split()


def _zombie() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # exited but not reaped: a zombie
        state = proc_stat(Path(f"/proc/{p.pid}/stat"))[0]
        if state == "Z":
            return p
        time.sleep(0.01)
    raise AssertionError("child did not become a zombie")


def test_a_zombie_peer_counts_as_dead() -> None:
    from framework.comm.shm import _alive

    zombie = _zombie()
    try:
        assert not _alive(zombie.pid)
        assert _alive(os.getpid())
    finally:
        zombie.wait()


def test_stale_cleanup_skips_other_users_and_live_owners(tmp_path: Path) -> None:
    from framework.comm.shm import PREFIX, remove_stale_segments, segment_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine_stale = tmp_path / segment_name(dead.pid)
    mine_live = tmp_path / segment_name(os.getpid())
    other = tmp_path / f"{PREFIX}{os.getuid() + 1}-{dead.pid}-0123456789ab"
    for p in (mine_stale, mine_live, other):
        p.write_bytes(b"x")
    if os.getuid() == 0:  # as root, make the other user's file really someone else's
        os.chown(other, os.getuid() + 1, -1)
    assert remove_stale_segments(tmp_path) == [mine_stale]
    assert mine_live.exists() and other.exists() and not mine_stale.exists()


# -- 8. the group cache never hands out a group of a destroyed world ---------------------------
def test_group_cache_recognises_a_new_world_with_a_recycled_id(monkeypatch) -> None:
    import framework.comm.groups as groups

    stand_in = object()  # NON_GROUP_MEMBER: one object shared by every non-member group
    fake = SimpleNamespace(
        group=SimpleNamespace(WORLD=object()),
        GroupMember=SimpleNamespace(NON_GROUP_MEMBER=stand_in),
        new_group=lambda ranks, **kw: object(),
    )
    monkeypatch.setattr(groups, "dist", fake)
    monkeypatch.setattr(groups, "_free", {})
    monkeypatch.setattr(groups, "_world", [None])
    first = groups.acquire_group([0, 1], "gloo", 60.0)
    in_use = groups.acquire_group([0, 1], "gloo", 60.0)  # closed only after the new world
    groups.release_group([0, 1], "gloo", 60.0, *first)
    fake.group.WORLD = None  # destroy_process_group(); then a new init_process_group:
    gc.collect()
    fake.group.WORLD = object()  # CPython often reuses the address; the cache must not care
    assert not groups._free.get(groups._key([0, 1], "gloo", 60.0))
    groups.release_group([0, 1], "gloo", 60.0, *in_use)  # a group of the destroyed world
    again = groups.acquire_group([0, 1], "gloo", 60.0)[0]
    assert again is not first[0] and again is not in_use[0]
    # a non-member's stand-in of the destroyed world is dropped too, as members drop theirs
    groups.release_group([0, 1], "gloo", 60.0, stand_in, first[1])
    assert not groups._free.get(groups._key([0, 1], "gloo", 60.0))


# -- 14. results files: readable by others, durable --------------------------------------------
def test_results_are_written_0644_and_fsynced(tmp_path: Path, monkeypatch) -> None:
    import experiments.common as common

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(common.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    old = os.umask(0o022)
    try:
        common.write_json_atomic(tmp_path / "results.json", {"status": "ok"})
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644  # as open() at 022
    assert len(synced) == 2  # the file, then its directory (the rename)
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "ok"}


# -- 4, 5. killed jobs leave a record; a killed launcher leaves no orphans ---------------------
def _ranks_of(pid: int) -> set[int]:
    """The spawned ranks (children running multiprocessing's spawn_main) of process ``pid``."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = proc_stat(stat)
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmd:
            out.add(int(stat.parent.name))
    return out


def _alive(pids: set[int]) -> set[int]:
    from framework.comm.shm import _alive as alive

    return {p for p in pids if alive(p)}


def _infer(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """A job that decodes for several seconds: small shapes, 2 layers, 900 new tokens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [
        "model=small",
        "model.num_layers=2",
        "workload.new_tokens=900",
        "logger=none",
        "progress=false",
        "parallel.timeout_s=10",
        f"hydra.run.dir={tmp_path}",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.infer", *args, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.full
def test_launcher_killed_while_ranks_import_leaves_no_orphans(tmp_path: Path) -> None:
    # a job of minutes: orphans would still be decoding long after the deadline below
    job = _infer(tmp_path, "strategy=shm", "model.max_seq_len=8192", "workload.new_tokens=8000")
    try:
        ranks = _wait_for(lambda: _ranks_of(job.pid), 60, "ranks to be spawned")
        job.kill()  # SIGKILL in the first seconds: no handler runs in the launcher
        job.wait(timeout=10)
        _wait_for(lambda: not _alive(ranks), 3, f"orphaned ranks {_alive(ranks)} to exit")
    finally:
        if job.poll() is None:
            job.kill()


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, marks=pytest.mark.full),
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    ],
)  # one handler serves both
def test_interrupted_job_is_recorded_as_killed(tmp_path: Path, sig: signal.Signals) -> None:
    from experiments.report import collect

    job = _infer(tmp_path / "job", "strategy=naive")
    try:
        steps = tmp_path / "job" / "steps" / "metrics.csv"
        _wait_for(lambda: steps.exists() or job.poll() is not None, 120, "decoding to start")
        assert job.poll() is None, job.stderr.read()[-3000:]
        job.send_signal(sig)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == -sig  # it still dies of the signal, as without the record
    res = json.loads((tmp_path / "job" / "results.json").read_text())
    assert res["status"] == "killed" and res["signal"] == sig.name
    (tmp_path / "other" / ".hydra").mkdir(parents=True)  # a job killed with SIGKILL
    rows = {r["job"]: r["status"] for r in collect(tmp_path)[0]}
    assert rows == {"job": "killed", "other": "missing"}


# -- 11. the loaded-host option ---------------------------------------------------------------
def test_background_load_runs_busy_processes_and_stops_them() -> None:
    from framework.comm.shm import _alive as alive
    from framework.run.measure import background_load

    with background_load(2) as pids:
        assert len(pids) == 2
        time.sleep(0.3)
        for pid in pids:  # spinning: runnable and using CPU
            fields = proc_stat(Path(f"/proc/{pid}/stat"))
            assert fields[0] == "R" and int(fields[11]) > 0, fields[:12]
    assert not any(alive(pid) for pid in pids)


def test_a_killed_job_finishes_its_tracker_run_as_killed(tmp_path: Path, monkeypatch) -> None:
    """run_job's SIGTERM path in-process: recorded, the tracker finished with 128 + signal,
    and the process would then die of the signal (os.kill recorded instead)."""
    from conftest import compose_config

    import experiments.common as common

    calls: list = []

    class Recorder(common.NullTracker):
        def log(self, data: dict) -> None:
            calls.append(("log", data.get("status")))

        def finish(self, exit_code: int) -> None:
            calls.append(("finish", exit_code))

    def body(out_dir, tracker):
        raise common.JobInterrupted(signal.SIGTERM)  # what the handler raises

    killed: list = []
    monkeypatch.setattr(common, "make_tracker", lambda *a: Recorder())
    monkeypatch.setattr(common.os, "kill", lambda pid, sig: killed.append(sig))
    cfg = compose_config("logger=none", hydra_dir=tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(common.JobInterrupted):
            common.run_job(cfg, "infer", body, "results.json")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ("log", "killed") in calls and ("finish", 128 + signal.SIGTERM) in calls
    assert killed == [signal.SIGTERM]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "killed" and saved["signal"] == "SIGTERM"


def test_a_thread_queued_on_my_cpu_is_seen() -> None:
    """The wait policy's probe: a runnable thread whose last CPU is mine waits for my CPU."""
    from framework.comm.shm import queued_on_this_cpu

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to move the other process between them")
    mine = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    fd = os.open(f"/proc/{busy.pid}/stat", os.O_RDONLY)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        os.sched_setaffinity(busy.pid, {cpus[0]})
        time.sleep(0.3)  # it runs whenever this test sleeps: its last CPU is ours
        assert queued_on_this_cpu(fd)
        os.sched_setaffinity(busy.pid, {cpus[1]})
        time.sleep(0.3)
        assert not queued_on_this_cpu(fd)
        assert not queued_on_this_cpu(-1)
    finally:
        os.close(fd)
        os.sched_setaffinity(0, mine)
        busy.kill()
        busy.wait()


def test_report_lists_missing_jobs_in_their_own_table(tmp_path: Path) -> None:
    from experiments.report import collect

    for name, job in (("i", "infer"), ("b", "bench")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    name: {job}\n")
    infer, bench = collect(tmp_path)
    assert [(r["job"], r["status"]) for r in infer] == [("i", "missing")]
    assert [(r["job"], r["mode"]) for r in bench] == [("b", "missing")]


def test_wait_work_spends_what_is_left_of_timeout() -> None:
    """An algorithm of several asynchronous steps waits each with the time left."""
    from framework.comm.algorithm import Algorithm as Base

    class Work:
        def __init__(self, completed: bool = False) -> None:
            self.timeouts: list[float] = []
            self.completed = completed

        def wait(self, timeout) -> bool:
            self.timeouts.append(timeout.total_seconds())
            return True

        def is_completed(self) -> bool:
            return self.completed

    class Probe(Base):
        def reduce_(self, x: torch.Tensor) -> None: ...

    algo = Probe.__new__(Probe)  # no group: only the clock matters here
    algo._cuda, algo.timeout_s, algo.name, algo.rank = False, 2.0, "probe", 0
    algo._broken, algo._owner, algo.world_size = False, algo, 2
    algo.deadline = time.monotonic() + 2.0
    work = Work()
    algo.wait_work(work)
    time.sleep(0.2)
    algo.wait_work(work)
    assert 1.9 < work.timeouts[0] <= 2.0 and work.timeouts[1] < 1.85
    algo.deadline = time.monotonic() - 0.01  # spent: a finished step still counts as done
    algo.wait_work(Work(completed=True))
    assert not algo._broken
    with pytest.raises(CommError, match=r"not complete within timeout_s=2\.0"):
        algo.wait_work(work)  # an unfinished one fails at once, and the communicator with it
    assert len(work.timeouts) == 2 and algo._broken
