"""Start ranks with Lightning Fabric, in-process or inside an external launcher.

In-process (the default) Fabric spawns ``world_size`` processes with multiprocessing, so a
Hydra job starts its own ranks and never re-runs the sweep (Fabric's ``popen`` launcher would
re-execute the command line). Under torchrun or a multi-task SLURM step the processes already
exist: Fabric joins them instead (TorchElastic / SLURM cluster environments), with
``devices`` = ranks per node and ``num_nodes`` from the launcher. Every process group gets the
configured timeout; torch's 30-minute default is never inherited.

An in-process launch keeps its ranks to this host: they meet through a ``FileStore`` in a
private directory (torch's ``env://`` rendezvous would start a TCP store on rank 0 that listens
on every interface), and gloo binds its sockets to loopback. Under an external launcher the
launcher owns the rendezvous.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from framework.comm.env import is_rank_zero, launched_externally, ranks_per_node_from_env
from framework.comm.groups import forget_groups
from framework.run import lifeline
from framework.run.binding import bind_rank
from framework.run.faults import RankFailure
from framework.run.spec import ConfigError, ParallelSpec, resolve_backend, resolve_device


class OversubscriptionWarning(UserWarning):
    """More busy threads than CPU cores: the ranks take turns, and the timings show it."""


def __getattr__(name: str) -> Any:
    # PEP 562: a spawned rank finds PrivateRendezvousDDP by name when it unpickles Fabric's
    # strategy; the class is defined on first use since importing lightning takes seconds
    if name == "PrivateRendezvousDDP":
        return _private_rendezvous_ddp()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _private_rendezvous_ddp() -> type:
    """The class ``PrivateRendezvousDDP``, defined (importing lightning) on first use."""
    if "PrivateRendezvousDDP" in globals():
        return globals()["PrivateRendezvousDDP"]
    from lightning.fabric.strategies import DDPStrategy
    from lightning.fabric.utilities.distributed import _init_dist_connection

    class PrivateRendezvousDDP(DDPStrategy):
        """Lightning's DDP strategy with the ranks meeting through a ``FileStore`` in
        ``store_dir`` (a 0700 directory) instead of ``env://``'s TCP store, which listens on
        every interface while the job runs. Only for the ranks of one host."""

        __qualname__ = "PrivateRendezvousDDP"  # pickled by reference to this module's name

        def __init__(self, store_dir: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.store_dir = store_dir

        def _setup_distributed(self) -> None:
            # DDPStrategy._setup_distributed (lightning 2.6) with init_method added: the
            # kwargs of _init_dist_connection go to torch.distributed.init_process_group
            self._set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            assert self.cluster_environment is not None
            _init_dist_connection(
                self.cluster_environment,
                self._process_group_backend,
                timeout=self._timeout,
                device_id=self.root_device if self.root_device.type != "cpu" else None,
                init_method=f"file://{self.store_dir}/store",
            )

    globals()["PrivateRendezvousDDP"] = PrivateRendezvousDDP
    return PrivateRendezvousDDP


def launch_ranks(
    fn: Callable[..., Any],
    parallel: ParallelSpec,
    *args: Any,
    callbacks: list[Any] | None = None,
    loggers: list[Any] | None = None,
) -> Any:
    """Run ``fn(fabric, *args)`` on every rank; return rank 0's value.

    ``fn`` must be importable by name (spawned ranks unpickle it). A rank that raises makes
    this raise, naming the rank; the process-group timeout bounds any wait on a lost peer.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    backend = resolve_backend(parallel)
    external = launched_externally()
    nodes, devices = 1, parallel.world_size
    if external:
        local = ranks_per_node_from_env() or 1
        world = int(os.environ.get("WORLD_SIZE") or os.environ["SLURM_NTASKS"])
        if world != parallel.world_size:
            raise ConfigError(
                f"parallel.world_size={parallel.world_size} but the launcher "
                f"started {world} processes"
            )
        nodes, devices = world // local, local
    if resolve_device(parallel) == "cpu" and is_rank_zero():
        warn_if_oversubscribed(parallel, ranks_here=devices)
    common = {"process_group_backend": backend, "timeout": timedelta(seconds=parallel.timeout_s)}

    def fabric_with(strategy: DDPStrategy) -> Fabric:
        return Fabric(
            accelerator="cuda" if backend == "nccl" else "cpu",
            devices=devices,
            num_nodes=nodes,
            strategy=strategy,
            callbacks=callbacks or [],
            loggers=loggers or [],
        )

    if external:
        fabric = fabric_with(DDPStrategy(start_method="popen", **common))
        fabric.launch()
        bind_rank(parallel.cpu_bind, fabric.local_rank, devices, parallel.threads_per_rank)
        return fn(fabric, *args)
    # Inside a joblib (loky) worker the process-wide start method is "loky", which the
    # spawned ranks cannot resolve when they unpickle their preparation data.
    if multiprocessing.get_start_method(allow_none=True) not in (
        None,
        "spawn",
        "fork",
        "forkserver",
    ):
        multiprocessing.set_start_method("spawn", force=True)
    store_dir = tempfile.mkdtemp(prefix="commlab-rendezvous-")  # 0700: this user's ranks only
    fabric = fabric_with(_private_rendezvous_ddp()(store_dir, start_method="spawn", **common))
    os.environ[lifeline.ENV] = str(os.getpid())  # the ranks spawned now follow this process
    try:
        with _gloo_on_loopback():
            return fabric.launch(_and_teardown, parallel, fn, *args)
    except ProcessException as e:  # one rank died or raised; the others were terminated
        raise RankFailure(_failure_message(e)) from None
    finally:
        os.environ.pop(lifeline.ENV, None)  # later children of this process are not its ranks
        shutil.rmtree(store_dir, ignore_errors=True)


def warn_if_oversubscribed(parallel: ParallelSpec, ranks_here: int) -> None:
    """Say what running more busy threads than cores costs; the run goes on (a small host
    running several ranks is a supported setup, the test suite's among them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = ranks_here * parallel.threads_per_rank
    if not cores or threads <= cores:
        return
    here = "" if ranks_here == parallel.world_size else f" ({ranks_here} ranks on this host)"
    warnings.warn(
        f"parallel.world_size={parallel.world_size}{here} x parallel.threads_per_rank="
        f"{parallel.threads_per_rank} = {threads} busy threads on the {cores} CPU cores this "
        f"process may use: oversubscribed {threads / cores:.1f}x. The ranks take turns on the "
        "cores, so the timings include time spent waiting for a core: latencies are inflated, "
        "bandwidths deflated and repeats spread wider; compare them only with runs at the same "
        "oversubscription.",
        OversubscriptionWarning,
        stacklevel=2,
    )


@contextmanager
def _gloo_on_loopback() -> Iterator[None]:
    """Ranks spawned inside this block inherit GLOO_SOCKET_IFNAME=lo, so gloo's sockets
    listen on 127.0.0.1 rather than on whatever address the host name resolves to. A user's
    own setting is kept."""
    if "GLOO_SOCKET_IFNAME" in os.environ or "lo" not in {n for _, n in socket.if_nameindex()}:
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        yield
    finally:
        os.environ.pop("GLOO_SOCKET_IFNAME", None)


def _failure_message(e: ProcessException) -> str:
    """Our own words for how the rank ended (a signal, an exit code, an exception), then
    torch's report; tests and users read the first line, not torch's wording."""
    detail = str(e).strip()
    signal_name = getattr(e, "signal_name", None)
    exit_code = getattr(e, "exit_code", None)
    if signal_name:
        how = f"was killed by signal {signal_name}"
    elif exit_code is not None:
        how = f"exited with code {exit_code}"
    else:
        how = "raised: " + (detail.splitlines()[-1] if detail else type(e).__name__)
    return f"rank {e.error_index} (pid {e.error_pid}) {how}\n{detail[-4000:]}"


def _and_teardown(fabric: Any, parallel: ParallelSpec, fn: Callable[..., Any], *args: Any) -> Any:
    """Pin the spawned rank (``parallel.cpu_bind``), run ``fn`` on it, then tear the process
    groups down before it exits.

    A spawned rank that exits with live gloo groups sometimes dies in the interpreter's
    shutdown with "terminate called without an active exception" (SIGABRT) after its work
    is done, failing a finished job (seen once in 8 jobs of the main sweep). The barrier makes
    sure no peer still talks to this rank; on an error the rank just raises (its peers are
    stopped by the launcher, a barrier could only wait for the timeout).
    """
    lifeline.follow_parent()  # torch armed SIGINT; make it SIGKILL, and check again
    bind_rank(parallel.cpu_bind, fabric.local_rank, parallel.world_size, parallel.threads_per_rank)
    out = fn(fabric, *args)
    if dist.is_initialized():
        dist.barrier()
        forget_groups()
        dist.destroy_process_group()
    return out
