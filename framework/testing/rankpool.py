"""A pool of long-lived ranks for tests and the conformance kit.

Spawning a rank costs seconds (importing torch), so tests spawn ``world_size`` processes once,
join them into a gloo group through a FileStore (no fixed port), and send them functions to
run. ``run`` never hangs: past its deadline it asks the silent ranks for their Python stacks
(faulthandler on SIGUSR1), kills the pool and raises :class:`RankFailure` naming each hung rank
with its stack. A rank that raises reports its traceback; the others get a short grace period
to finish (they may be blocked in a collective with the failed rank) before the pool is torn
down. A broken pool reports ``healthy == False`` so fixtures can build a new one.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from framework.run.faults import RankFailure


def _worker(
    rank: int,
    world: int,
    store: str,
    tasks,
    results,
    stack_dir: str,
    pg_timeout_s: float,
    env: dict[str, str],
    backend: str,
) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    from framework.comm.groups import forget_groups

    torch.set_num_threads(1)
    stack_file = open(Path(stack_dir) / f"rank{rank}.stack", "w")  # noqa: SIM115 (lives on)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=pg_timeout_s),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # report everything, including assertion failures
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    forget_groups()
    dist.destroy_process_group()


class RankPool:
    def __init__(
        self,
        world_size: int,
        *,
        pg_timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
        backend: str = "gloo",
    ) -> None:
        self.world_size = world_size
        self._tmp = tempfile.TemporaryDirectory(prefix="commlab-pool-")
        store = os.path.join(self._tmp.name, "store")
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self._procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                name=f"commlab-rank{r}",
                args=(
                    r,
                    world_size,
                    store,
                    self._tasks[r],
                    self._results,
                    self._tmp.name,
                    pg_timeout_s,
                    env,
                    backend,
                ),
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.healthy = True

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0, **kwargs: Any
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in order.

        ``fn`` must be importable by name (a module-level function) so it pickles.
        """
        if not self.healthy:
            raise RankFailure("rank pool is broken by an earlier failure; build a new one")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            failed = [r for r, (ok, _) in got.items() if not ok]
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
            if dead:
                for r in dead:
                    got[r] = (False, f"process died with exit code {self._procs[r].exitcode}")
                continue
            wait_until = min(deadline, time.monotonic() + 10.0) if failed else deadline
            try:
                r, ok, val = self._results.get(
                    timeout=max(0.05, min(1.0, wait_until - time.monotonic()))
                )
                got[r] = (ok, val)
            except queue.Empty:
                if time.monotonic() >= wait_until:
                    break
        missing = [r for r in range(self.world_size) if r not in got]
        errors = {r: v for r, (ok, v) in got.items() if not ok}
        if not missing and not errors:
            return [got[r][1] for r in range(self.world_size)]
        stacks = self._stacks(missing) if missing else {}
        self.close(force=True)
        lines = [f"{getattr(fn, '__name__', fn)} failed on world size {self.world_size}:"]
        lines += [f"rank {r} raised: {v}" for r, v in sorted(errors.items())]
        lines += [
            f"rank {r} hung (no answer within the deadline); its stack:\n{stacks[r]}"
            for r in missing
        ]
        raise RankFailure("\n".join(lines))

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        for r in ranks:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        time.sleep(1.0)
        path = Path(self._tmp.name)
        return {r: (path / f"rank{r}.stack").read_text()[-4000:] or "(no stack)" for r in ranks}

    def close(self, force: bool = False) -> None:
        if not force and self.healthy:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.healthy = False
        self._tmp.cleanup()
