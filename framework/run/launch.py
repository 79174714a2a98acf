"""Start ranks with Lightning Fabric, in-process or inside an external launcher.

In-process (the default) Fabric spawns ``world_size`` processes with multiprocessing, so a
Hydra job starts its own ranks and never re-runs the sweep (Fabric's ``popen`` launcher would
re-execute the command line). Under torchrun or a multi-task SLURM step the processes already
exist: Fabric joins them instead (TorchElastic / SLURM cluster environments), with
``devices`` = ranks per node and ``num_nodes`` from the launcher. Every process group gets the
configured timeout; torch's 30-minute default is never inherited.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from framework.comm.env import launched_externally, ranks_per_node_from_env
from framework.comm.groups import forget_groups
from framework.run import lifeline
from framework.run.faults import RankFailure
from framework.run.spec import ConfigError, ParallelSpec, resolve_backend


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
    else:
        os.environ.pop("MASTER_PORT", None)  # a fresh free port for every in-process launch
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # Inside a joblib (loky) worker the process-wide start method is "loky", which the
        # spawned ranks cannot resolve when they unpickle their preparation data.
        if multiprocessing.get_start_method(allow_none=True) not in (
            None,
            "spawn",
            "fork",
            "forkserver",
        ):
            multiprocessing.set_start_method("spawn", force=True)
    strategy = DDPStrategy(
        start_method="popen" if external else "spawn",
        process_group_backend=backend,
        timeout=timedelta(seconds=parallel.timeout_s),
    )
    fabric = Fabric(
        accelerator="cuda" if backend == "nccl" else "cpu",
        devices=devices,
        num_nodes=nodes,
        strategy=strategy,
        callbacks=callbacks or [],
        loggers=loggers or [],
    )
    if external:
        fabric.launch()
        return fn(fabric, *args)
    os.environ[lifeline.ENV] = str(os.getpid())  # the ranks spawned now follow this process
    try:
        return fabric.launch(_and_teardown, fn, *args)
    except ProcessException as e:  # one rank died or raised; the others were terminated
        raise RankFailure(_failure_message(e)) from None
    finally:  # later children of this process are not its ranks
        os.environ.pop(lifeline.ENV, None)


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


def _and_teardown(fabric: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on a spawned rank, then tear the process groups down before it exits.

    A spawned rank that exits with live gloo groups sometimes dies in the interpreter's
    shutdown with "terminate called without an active exception" (SIGABRT) after its work
    is done, failing a finished job (seen once in 8 jobs of the main sweep). The barrier makes
    sure no peer still talks to this rank; on an error the rank just raises (its peers are
    stopped by the launcher, a barrier could only wait for the timeout).
    """
    lifeline.follow_parent()  # torch armed SIGINT; make it SIGKILL, and check again
    out = fn(fabric, *args)
    if dist.is_initialized():
        dist.barrier()
        forget_groups()
        dist.destroy_process_group()
    return out
