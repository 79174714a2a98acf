"""Writing a file so that a reader never sees it torn: the results of a job, a tuning table."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[str]]:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync
    the directory: a reader sees the old file or the new one, never a torn one, even when the
    writer or the machine dies mid-write (a write cut short leaves the old file as it was).
    The file gets the mode ``open`` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
