"""Spawned ranks die with the process that launched them, whenever that process dies.

torch's spawn asks the kernel for a parent-death signal only once a rank has imported
everything (seconds on a small host). A launcher killed before then (Ctrl-C or a scheduler
in the first seconds of a sweep job) left ranks running the whole job as orphans of pid 1.
So the launcher names itself in ``COMMLAB_PARENT_PID`` while it spawns, and each rank calls
:func:`follow_parent` as the first thing it imports (``experiments/__init__.py``) and again
when its work starts: the kernel will SIGKILL it when the parent dies, and if the parent is
already gone it exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "COMMLAB_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_launcher: list[int] = []  # the pid read from ENV (which is then removed: not inherited)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; else nothing)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: callers check the parent themselves
            pass


def follow_parent() -> None:
    """In a rank spawned by :func:`framework.run.launch.launch_ranks`: die with the launcher."""
    if not _launcher:
        want = os.environ.get(ENV, "")
        if not want.isdigit() or int(want) == os.getpid():  # not a rank (or the launcher)
            return
        del os.environ[ENV]  # this rank's own children are not the launcher's ranks
        _launcher.append(int(want))
    die_with_parent()
    if os.getppid() != _launcher[0]:  # the launcher died before the signal was armed
        sys.stderr.write(f"commlab: launcher (pid {_launcher[0]}) is gone; rank exits\n")
        os._exit(1)
