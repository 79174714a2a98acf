"""Tuning tables: which algorithm is fastest for each (op, world size, dtype, size bucket).

Production stacks choose an all-reduce per message from tables measured per host (SGLang's
tuning tables, vLLM's per-world-size thresholds, TensorRT-LLM's AUTO). Here a table is a JSON
file read by the ``auto`` strategy by name or path. A size bucket is a power of two: bucket b
holds the messages of (b/2, b] bytes.

Where tables live: ``python -m experiments.bench bench.tune=<name>`` writes the user's table
``<name>.json`` in the user directory (``$COMMLAB_TABLES``, else
``$XDG_DATA_HOME/commlab/tables``, else ``~/.local/share/commlab/tables``); a name is looked up
there first, then among the tables that ship with commlab as package data (``conf/tables``:
``this_host``, measured on the project's 2-core VM). A name ending in ``.json`` is a path.

A write is atomic and serialised: read, merge and rewrite run under an exclusive ``flock`` on
``<table>.json.lock``, and the new text goes to a temporary file (mode 0666 less the umask, as
``open`` gives) that is fsynced and renamed over the table, so two writers never lose each
other's rows and a reader never sees a torn file. A table is checked row by row when it is
loaded (every rank loads it, so a bad one fails on every rank alike) and before a merge (a
malformed table is refused, not overwritten), and every error names the file.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import importlib.resources
import json
import os
import sys
from pathlib import Path
from typing import Any

from framework.comm.files import atomic_open

OPS = ("all_reduce", "reduce_scatter", "all_gather")


def user_tables_dir() -> Path:
    """Where ``bench.tune`` writes and names are looked up first (see the module docstring)."""
    if os.environ.get("COMMLAB_TABLES"):
        return Path(os.environ["COMMLAB_TABLES"])
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "commlab" / "tables"


def packaged_tables_dir() -> Path:
    """The tables that ship with commlab (``commlab_conf`` package data; conf/ in a checkout)."""
    try:
        return Path(str(importlib.resources.files("commlab_conf"))) / "tables"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "conf" / "tables"


def bucket_of(nbytes: int) -> int:
    """The size bucket of a message: the smallest power of two >= ``nbytes`` (at least 1)."""
    return 1 << max(int(nbytes) - 1, 0).bit_length()


def table_path(name: str, for_writing: bool = False) -> Path:
    """A table by path (``name`` ends in ``.json``) or by name: the user's, else the packaged
    one (for writing: always the user's)."""
    if name.endswith(".json"):
        return Path(name)
    mine = user_tables_dir() / f"{name}.json"
    if for_writing or mine.exists():
        return mine
    shipped = packaged_tables_dir() / f"{name}.json"
    return shipped if shipped.exists() else mine


def available_tables() -> list[str]:
    dirs = (user_tables_dir(), packaged_tables_dir())
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.json")})


def load_table(name: str) -> dict[str, Any]:
    """The table ``name`` (see :func:`table_path`), checked row by row: a ``ValueError``
    naming the file, row and field for anything ``auto`` could not use."""
    path = table_path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"tuning table {name!r} not found at {path} (tables: {available_tables() or 'none'}"
            f"; user tables live in {user_tables_dir()}); write one with: "
            f"python -m experiments.bench bench.tune={name}"
        )
    st = path.stat()
    return copy.deepcopy(_read_once(str(path), st.st_ino, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=32)
def _read_once(path: str, inode: int, mtime_ns: int, size: int) -> dict[str, Any]:
    """A table read and checked once per version of the file (``auto`` checks its options
    before building, then builds: one read, not two). Writers rename a new file over the
    table, so a rewrite changes the inode, whatever the clock's resolution."""
    return _read(Path(path))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tuning table {path}: not readable JSON ({e})") from None
    check_table(data, path)
    return data


def check_table(data: Any, path: Path | str) -> None:
    """Raise ``ValueError`` naming ``path``, the row and the field at the first problem."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"tuning table {path}: must be an object with a list 'rows'")
    for i, row in enumerate(data["rows"]):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"tuning table {path}: row {i}: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_time(v: Any) -> bool:
    # a comparison, not math.isfinite, which raises OverflowError (not ValueError) on an
    # integer past the float range (1e400 written out in full)
    return (_is_int(v) or isinstance(v, float)) and 0 <= v <= sys.float_info.max


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"must be an object, got {row!r}"
    rules = {
        "op": (lambda v: v in OPS, f"one of {list(OPS)}"),
        "dtype": (lambda v: isinstance(v, str) and v, "a dtype name such as 'float32'"),
        "world_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "bucket_bytes": (
            lambda v: _is_int(v) and v >= 1 and v & (v - 1) == 0,
            "a power of two >= 1 (an integer)",
        ),
        "algorithm": (lambda v: isinstance(v, str) and v, "a strategy name"),
        "time_us": (_is_time, "a finite number >= 0"),
    }
    for key, (ok, allowed) in rules.items():
        if key not in row:
            return f"'{key}' is missing; it must be {allowed}"
        if not ok(row[key]):
            return f"'{key}' is {row[key]!r}; it must be {allowed}"
    return None


def merge_rows(name: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write ``rows`` into table ``name``, replacing the rows of the same (op, world size,
    dtype) and keeping the others (tables grow one bench run at a time); atomic and
    serialised with other writers (module docstring)."""
    path = table_path(name, for_writing=True)
    check_table({"rows": rows}, f"{path} (new rows)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        old: dict[str, Any] = {"rows": []}
        if path.exists():
            try:
                old = _read(path)
            except ValueError as e:
                raise ValueError(f"{e}; not merged into (fix or remove the file)") from None
        keys = {(r["op"], r["world_size"], r["dtype"]) for r in rows}
        kept = [r for r in old["rows"] if (r["op"], r["world_size"], r["dtype"]) not in keys]
        merged = sorted(
            kept + rows, key=lambda r: (r["op"], r["world_size"], r["dtype"], r["bucket_bytes"])
        )
        with atomic_open(path) as f:  # the old table or the new one, never a torn one
            f.write(json.dumps({**old, **meta, "rows": merged}, indent=1) + "\n")
    return path


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``<path>.lock`` (blocking: writers take turns)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def describe(rows: list[dict[str, Any]]) -> list[str]:
    """One line per range of adjacent size buckets with the same choice: ``all_reduce float32
    p=2: 129 B-4 KiB -> shm (3.1-9.8 us)``."""
    lines: list[str] = []
    group: list[dict[str, Any]] = []

    def close() -> None:
        if group:
            r0, r1 = group[0], group[-1]
            lo = r0["bucket_bytes"] // 2 + 1 if r0["bucket_bytes"] > 1 else 1
            lines.append(
                f"{r0['op']} {r0['dtype']} p={r0['world_size']}: {_size(lo)}-"
                f"{_size(r1['bucket_bytes'])} -> {r0['algorithm']} "
                f"({r0['time_us']:.3g}-{r1['time_us']:.3g} us)"
            )

    for r in sorted(rows, key=lambda r: (r["op"], r["dtype"], r["world_size"], r["bucket_bytes"])):
        if group and (
            (r["op"], r["dtype"], r["world_size"], r["algorithm"])
            != (group[0]["op"], group[0]["dtype"], group[0]["world_size"], group[0]["algorithm"])
            or r["bucket_bytes"] != 2 * group[-1]["bucket_bytes"]  # a gap: buckets not seen
        ):
            close()
            group = []
        group.append(r)
    close()
    return lines


def _size(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"
