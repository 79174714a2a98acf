"""What every entry point shares: config to spec, atomic results, the tracker, failure handling."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.comm.env import is_rank_zero
from framework.comm.files import atomic_open
from framework.run.results import flat_summary
from framework.run.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment a study runs its measuring jobs in: one thread per rank (several ranks
    share this host's cores) and W&B off."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run_module(args: list[str], timeout: float = 3600) -> None:
    """``python -m <args>`` from the project root in :func:`child_env`; raises if it fails."""
    cmd = [sys.executable, "-m", *args]
    subprocess.run(cmd, cwd=ROOT, env=child_env(), check=True, timeout=timeout)


def strategy_options_from(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    opts = OmegaConf.to_container(cfg.strategy, resolve=True)
    name = opts.pop("name")
    return name, {k: v for k, v in opts.items() if v is not None or k == "table"}


def run_spec(cfg: DictConfig, out_dir: str) -> RunSpec:
    name, opts = strategy_options_from(cfg)
    # the groups are the specs' own structured configs: to_object builds the dataclasses
    return RunSpec(
        strategy=name,
        strategy_options=opts,
        model=OmegaConf.to_object(cfg.model),
        workload=OmegaConf.to_object(cfg.workload),
        parallel=OmegaConf.to_object(cfg.parallel),
        seed=cfg.seed,
        out_dir=out_dir,
        fault=OmegaConf.to_object(cfg.fault),
        profile=bool(cfg.get("profile", False)),
        compare=list(cfg.compare) if cfg.get("compare") else None,
    )


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(_clean(data), f, indent=2)


def _clean(x: Any) -> Any:
    """JSON has no NaN: write null so every reader can parse the file."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


class NullTracker:
    """Stand-in when logger=none: does nothing, imports nothing."""

    def log(self, data: dict[str, Any]) -> None: ...

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None: ...

    def attach(self, path: str | Path) -> None: ...

    def finish(self, exit_code: int) -> None: ...


class WandbTracker(NullTracker):
    """One W&B run per Hydra job (created in the job process, which is rank 0's host)."""

    def __init__(self, cfg: DictConfig, out_dir: str, job_type: str) -> None:
        import wandb  # lazily: logger=none must work without W&B installed
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        sweep = hc.sweep.dir if hc.mode.name == "MULTIRUN" else None
        self.wandb = wandb
        self.out_dir = out_dir
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=cfg.logger.mode,
            dir=out_dir,
            group=Path(str(sweep)).name if sweep else None,
            job_type=job_type,
            name=f"{job_type}-{cfg.strategy.name}-{Path(out_dir).name}",
            tags=list(cfg.logger.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log(self, data: dict[str, Any]) -> None:
        self.run.summary.update(flat_summary(data))

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            cols = list(rows[0])
            self.run.log(
                {key: self.wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}
            )

    def attach(self, path: str | Path) -> None:
        self.run.save(str(path), base_path=self.out_dir, policy="now")

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: DictConfig, out_dir: str, job_type: str) -> NullTracker:
    if cfg.logger.name == "none" or os.environ.get("WANDB_MODE") == "disabled":
        return NullTracker()
    return WandbTracker(cfg, out_dir, job_type)


class JobInterrupted(BaseException):
    """SIGTERM or SIGINT reached the job (a scheduler's preemption, Ctrl-C on a sweep)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`JobInterrupted` while the job runs, so that the
    job records itself before it dies (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise JobInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class JobDirError(RuntimeError):
    """The output directory cannot take this job: another job holds it, or the results could
    not be saved there. Raised before any rank starts, without writing to the directory."""


LOCK_FILE = ".commlab.lock"


class JobDirLock:
    """A job's hold on its output directory: an exclusive ``flock`` on ``.commlab.lock`` in
    it, a file naming the holder's pid. A second job given the same directory is refused at
    once instead of overwriting the first one's results. The kernel drops the lock when the
    holder dies, even of SIGKILL; a file left behind then holds nothing."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise JobDirError(
                    f"output directory {self.path.parent} is not writable "
                    f"({e.strerror}): the results could not be saved there"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise JobDirError(
                    f"output directory {self.path.parent} is in use by another job "
                    f"(pid {holder}, see {self.path}): a second job there would overwrite its "
                    "results. Give this job its own hydra.run.dir, or wait for that one to end."
                ) from None
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)  # its holder ended and unlinked it meanwhile: lock a new file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        # unlinked while still locked: a job that opened the file meanwhile tries a new one
        with suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(fd, fcntl.LOCK_UN)  # a forked child may share the descriptor
        os.close(fd)


def check_job_dir(out_dir: Path, result: Path) -> None:
    """Refuse a directory the results could not be saved in before any rank starts, rather
    than measure for minutes and lose it all at the last write."""
    if not out_dir.is_dir():
        raise JobDirError(f"output directory {out_dir} is not a directory")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise JobDirError(
            f"output directory {out_dir} is not writable: the results could not be saved there"
        )
    if result.is_dir():
        raise JobDirError(
            f"{result} is a directory: the results could not be saved there "
            "(remove it, or give this job another hydra.run.dir)"
        )


Artefact = Callable[[str, NullTracker, dict[str, Any]], Any]


def _write_late(step: Artefact, out_dir: str, tracker: NullTracker, results: dict) -> None:
    """A plot or copy written after the measurement: failing it is a warning, kept in the
    results, since what was measured is complete and already saved."""
    try:
        step(out_dir, tracker, results)
    except Exception as e:
        name = getattr(step, "__name__", repr(step))
        why = f"{name} failed: {type(e).__name__}: {e} (the measured results are kept)"
        print(f"WARNING: {why}", file=sys.stderr, flush=True)
        results.setdefault("warnings", []).append(why)


def run_job(
    cfg: DictConfig,
    job_type: str,
    body: Callable[[str, NullTracker], dict[str, Any]],
    result_file: str,
    after: Sequence[Artefact] = (),
) -> dict[str, Any]:
    """Run ``body`` and always leave a results file and a finished tracker run behind.

    The job holds its output directory while it runs (:class:`JobDirLock`); a directory
    that is in use, or where the results could not be saved, is refused with
    :class:`JobDirError` before ``body`` starts, and nothing in it is written.

    The results are saved as soon as ``body`` returns them; then each of ``after`` (plots:
    ``step(out_dir, tracker, results)``) runs, and one that fails is a warning, printed and
    kept in the results' ``warnings``, not a failed job.

    A failure is recorded as ``status: failed`` with the error, the W&B run is marked failed,
    and the exception propagates so the job exits non-zero (in a multirun, Hydra records the
    failed job and goes on with the others). A job interrupted by SIGTERM or SIGINT is
    recorded as ``status: killed`` with the signal (if it was still measuring), its W&B run
    finished with exit code 128 + signal, and the process then dies of that signal, as it
    would have (its ranks die with it: :mod:`framework.run.lifeline`). Only SIGKILL leaves no
    record; the report lists such a job directory as ``missing``.
    """
    from hydra.core.hydra_config import HydraConfig

    out_dir = HydraConfig.get().runtime.output_dir
    if not is_rank_zero():
        return body(out_dir, NullTracker())  # under torchrun/SLURM only rank 0 records
    path = Path(out_dir) / result_file
    check_job_dir(Path(out_dir), path)
    lock = JobDirLock(Path(out_dir))
    lock.acquire()
    try:
        return _recorded(cfg, job_type, body, after, out_dir, path, lock)
    finally:
        lock.release()


def _recorded(
    cfg: DictConfig,
    job_type: str,
    body: Callable[[str, NullTracker], dict[str, Any]],
    after: Sequence[Artefact],
    out_dir: str,
    path: Path,
    lock: JobDirLock,
) -> dict[str, Any]:
    tracker = make_tracker(cfg, out_dir, job_type)

    def record(data: dict[str, Any], exit_code: int) -> None:
        write_json_atomic(path, data)
        tracker.log(data)
        tracker.attach(path)
        tracker.finish(exit_code)

    def ended(status: str, **why: Any) -> dict[str, Any]:
        return {
            "job_type": job_type,
            "status": status,
            **why,
            "strategy": cfg.strategy.name,
            "world_size": cfg.parallel.world_size,
        }

    results: dict[str, Any] | None = None
    try:
        with _interruptible():
            results = {"job_type": job_type, **body(out_dir, tracker)}
            write_json_atomic(path, results)  # measured: saved before anything else can fail
            for step in after:
                _write_late(step, out_dir, tracker, results)
    except JobInterrupted as e:
        name = signal.Signals(e.signum).name
        if results is None:
            record(ended("killed", signal=name, error=str(e)), 128 + e.signum)
        else:  # the measurement is complete: keep it
            results.setdefault("warnings", []).append(f"{e} while writing plots")
            record(results, 128 + e.signum)
        lock.release()
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)  # die of the signal, as without the record
        raise
    except BaseException as e:
        record(
            ended("failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()), 1
        )
        raise
    record(results, 0)
    return results
