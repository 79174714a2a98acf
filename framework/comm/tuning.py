"""Tuning tables: which algorithm is fastest for each (op, world size, dtype, size bucket).

Production stacks choose an all-reduce per message from tables measured per host (SGLang's
tuning tables, vLLM's per-world-size thresholds, TensorRT-LLM's AUTO). Here a table is a JSON
file written by ``python -m experiments.bench bench.tune=<name>`` under ``results/tables/`` and
read by the ``auto`` strategy by name. A size bucket is a power of two: bucket b holds the
messages of (b/2, b] bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# results/tables of the project (an editable install or a checkout); COMMLAB_TABLES overrides
TABLES_DIR = Path(
    os.environ.get("COMMLAB_TABLES", Path(__file__).resolve().parents[2] / "results" / "tables")
)


def bucket_of(nbytes: int) -> int:
    """The size bucket of a message: the smallest power of two >= ``nbytes`` (at least 1)."""
    return 1 << max(int(nbytes) - 1, 0).bit_length()


def table_path(name: str) -> Path:
    """A table by name (``results/tables/<name>.json``) or by path (it ends in ``.json``)."""
    return Path(name) if name.endswith(".json") else TABLES_DIR / f"{name}.json"


def load_table(name: str) -> dict[str, Any]:
    path = table_path(name)
    if not path.exists():
        have = sorted(p.stem for p in TABLES_DIR.glob("*.json")) if TABLES_DIR.is_dir() else []
        raise FileNotFoundError(
            f"tuning table {name!r} not found at {path} (tables here: {have or 'none'}); "
            f"write one with: python -m experiments.bench bench.tune={name}"
        )
    return json.loads(path.read_text())


def merge_rows(name: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write ``rows`` into table ``name``, replacing the rows of the same (op, world size,
    dtype) and keeping the others (tables grow one bench run at a time)."""
    path = table_path(name)
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keys = {(r["op"], r["world_size"], r["dtype"]) for r in rows}
    kept = [r for r in old["rows"] if (r["op"], r["world_size"], r["dtype"]) not in keys]
    merged = sorted(
        kept + rows, key=lambda r: (r["op"], r["world_size"], r["dtype"], r["bucket_bytes"])
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**old, **meta, "rows": merged}, indent=1) + "\n")
    return path


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
