"""Devices, backends and the CUDA path, as far as a machine without a GPU can check them.

What runs on a GPU (the CUDA-stream launch, CUDA-graph capture, the kit with CUDA tensors) is
exercised by ``python -m experiments.gpu_check`` on a GPU host. Here: every strategy says
where it runs and refuses the rest with a clear error, the stream launch follows the
DDP-hook/vLLM protocol (checked against a recording stand-in for ``torch.cuda``), and a run
asking for CUDA graphs with a strategy that cannot be captured is refused before it starts.
"""

from __future__ import annotations

import importlib
from collections import deque
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from framework import (
    Algorithm,
    CommError,
    available_strategies,
    build_communicator,
    get_strategy,
    register_strategy,
)
from framework.comm.streams import StreamLauncher


def test_every_strategy_documents_its_devices() -> None:
    for name in available_strategies():
        doc = importlib.import_module(get_strategy(name).__module__).__doc__ or ""
        assert "Devices:" in doc, f"strategies/{name}.py: the docstring must say 'Devices: ...'"


def _refusals() -> dict[str, str]:
    """The error each strategy gives for a tensor on a device it does not support."""
    out = {}
    for name, opts in [
        ("naive", {}),
        ("shm", {}),
        ("tree", {}),
        ("bucketed", {"inner": "tree"}),
        ("async_overlap", {"inner": "naive"}),
    ]:
        comm = build_communicator(name, timeout_s=10, **opts)
        try:
            comm.all_reduce(torch.ones(4, device="meta"))
        except CommError as e:
            out[name] = str(e)
        finally:
            comm.close()
    return out


def test_unsupported_devices_are_refused(pools) -> None:
    got = pools(2).run(_refusals)[0]
    assert set(got) == {"naive", "shm", "tree", "bucketed", "async_overlap"}
    assert "it supports gloo: cpu, cuda tensors; nccl: cuda tensors" in got["naive"]
    assert "it supports gloo: cpu tensors" in got["shm"] and "nccl" not in got["shm"]
    assert "it supports gloo: cpu tensors; nccl: cuda tensors" in got["tree"]
    # a schedule runs where its inner algorithm runs
    assert "it supports gloo: cpu tensors; nccl: cuda tensors" in got["bucketed"]
    assert "it supports gloo: cpu, cuda tensors; nccl: cuda tensors" in got["async_overlap"]
    assert all("tensor is on meta" in msg for msg in got.values())


class NcclOnly(Algorithm):
    supports: ClassVar[dict[str, frozenset[str]]] = {"nccl": frozenset({"cuda"})}

    def reduce_(self, x: torch.Tensor) -> None:  # never reached on gloo
        raise AssertionError


def _build_nccl_only() -> str:
    if "test_nccl_only" not in available_strategies():
        register_strategy("test_nccl_only")(NcclOnly)
    try:
        build_communicator("test_nccl_only", timeout_s=10).close()
    except CommError as e:
        return str(e)
    return "built"


def test_unsupported_backend_is_refused_at_construction(pools) -> None:
    msg = pools(1).run(_build_nccl_only)[0]
    assert msg == (
        "strategy 'test_nccl_only' does not run on the gloo backend; it supports nccl: cuda tensors"
    )


def _graph_safety() -> dict[str, bool]:
    out = {}
    for name in ("naive", "tree", "shm", "bucketed", "async_overlap", "double_buffer"):
        comm = build_communicator(name, timeout_s=10)
        out[name] = comm.graph_safe
        comm.close()
    return out


def test_graph_safety_is_declared_per_backend(pools) -> None:
    # gloo blocks the host: nothing on it can be captured in a CUDA graph
    assert not any(pools(1).run(_graph_safety)[0].values())
    safe = {n for n in available_strategies() if "nccl" in get_strategy(n).graph_safe_backends}
    assert safe == {"naive"}  # the one whose capture gpu_check verifies on a GPU


# -- the CUDA-stream launch, against a recording stand-in for torch.cuda ------------------------
class _Recorder:
    """Records every stream and event call a launch makes, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.completed = False
        self.current_stream_obj = _Stream(self, "compute")

    def Stream(self, device=None):
        return _Stream(self, "comm")

    def Event(self, enable_timing=False):
        return _Event(self)

    def current_stream(self, device=None):
        return self.current_stream_obj

    def stream(self, s):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.log.append(f"enter {s.name}")

            def __exit__(self, *exc):
                rec.log.append(f"exit {s.name}")

        return _Ctx()

    def synchronize(self, device=None):
        self.log.append("HOST SYNC")


class _Stream:
    def __init__(self, rec: _Recorder, name: str) -> None:
        self.rec, self.name = rec, name

    def wait_stream(self, other: _Stream) -> None:
        self.rec.log.append(f"{self.name} waits {other.name}")

    def wait_event(self, ev: _Event) -> None:
        self.rec.log.append(f"{self.name} waits event {ev.ident}")

    def synchronize(self) -> None:
        self.rec.log.append("HOST SYNC")


class _Event:
    count = 0

    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec
        _Event.count += 1
        self.ident = _Event.count

    def record(self, stream: _Stream) -> None:
        self.rec.log.append(f"record {self.ident} on {stream.name}")

    def query(self) -> bool:
        return self.rec.completed

    def elapsed_time(self, other: _Event) -> float:
        return 2.5  # ms

    def synchronize(self) -> None:
        self.rec.log.append("HOST SYNC")


def test_stream_launch_follows_the_event_protocol() -> None:
    rec = _Recorder()
    launcher = StreamLauncher(cuda=rec)
    timings: deque = deque()
    x = torch.ones(8)

    def reduce(t: torch.Tensor) -> None:
        rec.log.append("collective")
        t.mul_(2)

    fut = launcher.launch(x, lambda: reduce(x), timings)
    start, end = _Event.count - 1, _Event.count
    assert rec.log == [
        "comm waits compute",  # the input is written on the compute stream
        "enter comm",
        f"record {start} on comm",
        "collective",  # enqueued on the communication stream
        f"record {end} on comm",
        "exit comm",
    ]
    assert fut.result() is x
    assert rec.log[-1] == f"compute waits event {end}"  # the consumer waits on the device
    assert not fut.done() and not timings  # not complete: no timing read, nothing waited for
    rec.completed = True
    assert fut.done()
    y = torch.ones(2)
    launcher.launch(y, lambda: reduce(y), timings)
    assert list(timings) == [(32, 2.5e-3)]  # the first launch's events, read once complete
    assert "HOST SYNC" not in rec.log


def test_config_refusals_name_the_device_and_the_graph_problem() -> None:
    from framework.run.spec import ParallelSpec, graph_problems, parallel_problems

    p = ParallelSpec(world_size=2, backend="gloo", device="cpu", cuda_graphs=True)
    assert parallel_problems(p) == [
        "parallel.cuda_graphs=true needs CUDA tensors; this run is on cpu"
    ]
    assert graph_problems("naive", {}, p)[0].startswith(
        "parallel.cuda_graphs=true: strategy 'naive' cannot be captured in a CUDA graph on gloo"
    )
    assert graph_problems("naive", {}, ParallelSpec(backend="nccl", cuda_graphs=True)) == []
    assert "tpu" in parallel_problems(ParallelSpec(device="tpu"))[0]
    nccl = ParallelSpec(backend="nccl", cuda_graphs=True)
    assert "cannot be captured" in graph_problems("naive", {"validate": True}, nccl)[0]


@pytest.mark.full
def test_gpu_check_prints_its_plan_and_exits_0_without_a_gpu() -> None:
    """CI has no GPU: ``--dry-run`` (and a plain run on a CPU host) prints the plan and exits
    0, measuring nothing; every step the plan names exists and the budgets fit 6 minutes."""
    import subprocess
    import sys

    from conftest import ROOT

    from experiments.gpu_check import STEPS

    assert sum(s.budget_s for s in STEPS) <= 360
    for extra in (["--dry-run"], []):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.gpu_check", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert all(s.name in out.stdout for s in STEPS)
        if not torch.cuda.is_available():
            assert ("dry run" if extra else "no CUDA device") in out.stdout


def test_gpu_check_steps_run_in_their_own_process_with_a_hard_budget() -> None:
    """A step that fails (here: no GPU) is recorded with its error; one that outlives its
    budget is killed with its process group and recorded as timed out."""
    import dataclasses

    from experiments.gpu_check import STEPS, run_step

    by_name = {s.name: s for s in STEPS}
    if not torch.cuda.is_available():
        status, lines, _ = run_step(by_name["stream_protocol"], {})
        assert status == "FAILED" and lines and "Error" in lines[0]
    slow = dataclasses.replace(by_name["kit_gloo_cuda"], budget_s=1)
    assert run_step(slow, {})[0] == "TIMED OUT after its 1 s budget"


def test_a_graph_replay_counts_the_captured_collectives_per_op() -> None:
    """A CUDA-graph replay bypasses Python: GraphDecode adds the capture's counts, totals and
    per op, for every replay (the capture itself needs a GPU; the bookkeeping does not)."""
    from framework import CommStats
    from framework.run.graphs import GraphDecode, _counters

    stats = CommStats()
    stats.count_call("reduce_scatter", 64)
    stats.count_collective("reduce_scatter", 32)
    before = _counters(stats)
    g = GraphDecode(model=None, comm=SimpleNamespace(stats=stats), micro_batches=1)
    g._per_step = {"calls": 2, "collectives": 2, "all_reduce/calls": 2, "all_reduce/bytes": 80}
    g._replayed(stats)
    g._replayed(stats)
    assert stats.calls == before["calls"] + 4 and stats.collectives == before["collectives"] + 4
    assert stats.by_op["all_reduce"]["calls"] == 4 and stats.by_op["all_reduce"]["bytes"] == 160
    assert stats.by_op["reduce_scatter"]["calls"] == 1 and stats.wait_s == 0.0
