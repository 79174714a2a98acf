"""A job's edges with its host: its output directory (one job at a time, checked before any
rank starts, results kept when a late plot fails), the rendezvous (nothing listens beyond
loopback) and the cores (oversubscription is said, not silent).

Every test here failed before its fix.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from conftest import compose_config


def _job(tmp_path: Path):
    return compose_config("logger=none", "progress=false", hydra_dir=tmp_path)


# -- fault 4: two jobs in one output directory --------------------------------------------------
def test_a_second_job_on_a_busy_directory_is_refused_and_the_first_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second job is refused before its body (which starts the ranks) runs; it names
    the directory and the holder, and the first job's results survive."""
    import experiments.common as common

    cfg = _job(tmp_path)

    def second(out_dir, tracker):
        raise AssertionError("the second job started its ranks")

    def first(out_dir, tracker):
        with pytest.raises(RuntimeError, match=rf"{tmp_path}.* in use .*pid {os.getpid()}"):
            common.run_job(cfg, "infer", second, "results.json")
        assert not (tmp_path / "results.json").exists()  # the refusal recorded nothing
        return {"status": "ok", "who": "first"}

    common.run_job(cfg, "infer", first, "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["who"] == "first"

    # the directory is free again once a job ends: ok, failed, or killed by a signal
    def fails(out_dir, tracker):
        raise ValueError("boom")

    def killed(out_dir, tracker):
        raise common.JobInterrupted(signal.SIGTERM)

    with pytest.raises(ValueError):
        common.run_job(cfg, "infer", fails, "results.json")
    monkeypatch.setattr(common.os, "kill", lambda pid, sig: None)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(common.JobInterrupted):
            common.run_job(cfg, "infer", killed, "results.json")
    finally:
        signal.signal(signal.SIGTERM, before)
    common.run_job(cfg, "infer", lambda d, t: {"status": "ok", "who": "last"}, "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["who"] == "last"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".hydra") == ["results.json"]


# -- fault 5: a finished measurement and a late write -------------------------------------------
def test_a_failed_plot_is_a_warning_and_leaves_no_torn_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """infer's main in-process, the measurement faked: the plot's write fails part-way (as
    under a file-size limit), the results are kept with a warning, and no PNG is left."""
    import matplotlib.figure

    import experiments.infer

    def measured(spec, loggers, progress):
        steps = Path(spec.out_dir) / "steps"
        steps.mkdir()
        (steps / "metrics.csv").write_text("step,itl_s\n0,0.01\n1,0.02\n")
        return {"status": "ok", "strategy": spec.strategy, "decode_tokens_per_s": 123.0}

    def torn(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half a plot")
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(experiments.infer, "launch", measured)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
    assert experiments.infer.main(_job(tmp_path)) == 123.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "ok" and saved["decode_tokens_per_s"] == 123.0
    [warning] = saved["warnings"]
    assert "File too large" in warning and "itl_per_step.png" in warning
    assert warning in capsys.readouterr().err
    assert not [p.name for p in tmp_path.iterdir() if "png" in p.name]


def test_an_unsavable_results_path_is_refused_before_spawning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import experiments.infer

    def spawned(*args, **kwargs):
        raise AssertionError("ranks were launched for a job that cannot save its results")

    monkeypatch.setattr(experiments.infer, "launch", spawned)
    (tmp_path / "results.json").mkdir()
    with pytest.raises(RuntimeError, match=rf"{tmp_path / 'results.json'} is a directory"):
        experiments.infer.main(_job(tmp_path))
    assert not any((tmp_path / "results.json").iterdir())


# -- the rendezvous and the cores, on ranks launched for real -----------------------------------
def _listening(pid: int) -> list[str]:
    """The addresses of the TCP sockets that process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw, port = fields[1].split(":")
            # /proc writes the address as 32-bit words in host byte order (little-endian)
            words = bytes.fromhex(raw)
            packed = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
            out.append(f"{socket.inet_ntop(family, packed)}:{int(port, 16)}")
    return out


def _rank_probe(fabric) -> dict:
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    mine = {
        "store": type(store).__name__,
        "store_dir_mode": (
            stat.S_IMODE(os.stat(os.path.dirname(store.path)).st_mode)
            if isinstance(store, dist.FileStore)
            else None
        ),
        "listening": _listening(os.getpid()),
    }
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


@pytest.mark.timeout(120)
@pytest.mark.full
def test_launched_ranks_meet_privately_and_oversubscription_is_said() -> None:
    """Two ranks launched in-process: their default store is a FileStore in a 0700 directory
    (no TCP store on every interface), no socket of theirs listens beyond loopback, and the
    launch warns once that they have more threads than cores (without refusing)."""
    from framework.run.launch import launch_ranks
    from framework.run.spec import ParallelSpec

    cores = len(os.sched_getaffinity(0))
    parallel = ParallelSpec(world_size=2, timeout_s=60, threads_per_rank=cores + 1, device="cpu")
    with pytest.warns(UserWarning) as caught:
        ranks = launch_ranks(_rank_probe, parallel)
    said = [str(w.message) for w in caught if "oversubscribed" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    threads = 2 * (cores + 1)
    assert (
        f"parallel.world_size=2 x parallel.threads_per_rank={cores + 1} = {threads} busy threads "
        f"on the {cores} CPU cores" in said[0]
    )
    assert f"oversubscribed {threads / cores:.1f}x" in said[0] and "timings" in said[0]
    for rank, got in enumerate(ranks):
        assert got["store"] == "FileStore" and got["store_dir_mode"] == 0o700, (rank, got)
        assert got["listening"], f"rank {rank}: the probe found no gloo socket at all"
        wide = [a for a in got["listening"] if not a.startswith(("127.", "::1:"))]
        assert not wide, f"rank {rank} listens beyond loopback: {wide}"
