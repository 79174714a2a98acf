"""Accuracy tables: what each inexact strategy cost a trained model, for ``auto``'s budget.

A speed table (:mod:`framework.comm.tuning`) says which algorithm is fastest per message; an
accuracy table says what an inexact one (a quantized wire) did to a model's output, measured end
to end: the quantized-communication study on the trained model writes one row per strategy
and world size from its ``numerics`` blocks. ``auto``'s ``error_budget`` reads it. Format::

    {"model": "smollm2", "eval_text": "python-docs", "rows": [
      {"strategy": "quantized:block=32,fmt=int8", "world_size": 2,
       "ppl_change": 0.0012, "ppl_change_hi": 0.0031, "kl_per_token": 0.0008}, ...]}

``strategy`` is the canonical label (:func:`framework.comm.registry.strategy_label`);
``ppl_change`` is perplexity / exact perplexity - 1 on the evaluation text and ``ppl_change_hi``
the top of its 95% interval (the budget is held against the top, not the middle). Tables are
found like speed tables: by path, else by name in the user's tables directory, else shipped
with commlab.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path
from typing import Any

from framework.comm.files import atomic_open
from framework.comm.registry import parse_strategy, strategy_label
from framework.comm.tuning import table_path

# what an error budget may bound: the two measured end to end, and the element error the
# strategy states itself (Communicator.error_bound, relative to the inputs' magnitude)
METRICS = ("ppl_change", "kl_per_token", "rel_error")
_FIELDS = {"strategy": str, "world_size": int, "ppl_change": float, "ppl_change_hi": float}
_FIELDS["kl_per_token"] = float


def load_accuracy(name: str) -> dict[str, Any]:
    """Accuracy table ``name``, checked row by row (a ``ValueError`` naming file and row)."""
    path = table_path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"accuracy table {name!r} not found at {path}; the quantized-communication study "
            f"writes one (docs/studies.md)"
        )
    st = path.stat()
    return copy.deepcopy(_read_once(str(path), st.st_ino, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=32)
def _read_once(name: str, inode: int, mtime_ns: int, size: int) -> dict[str, Any]:
    """A table read and checked once per version of the file: ``auto`` checks its options
    (reading the table) and then builds (reading it again) on every rank. A rewrite renames
    a new file over the old one, so it changes the inode whatever the clock's resolution."""
    path = Path(name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"accuracy table {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"accuracy table {path}: must be an object with a list 'rows'")
    for i, row in enumerate(data["rows"]):
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"accuracy table {path}: row {i}: {problem}")
    return data


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not an object"
    for key, kind in _FIELDS.items():
        v = row.get(key)
        if kind is float:
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                return f"{key} must be a finite number, got {v!r}"
        elif not isinstance(v, kind) or isinstance(v, bool):
            return f"{key} must be a {kind.__name__}, got {v!r}"
    return None


def accuracy_rows(name: str, world_size: int) -> dict[str, dict[str, Any]]:
    """Strategy label -> its row, for one world size."""
    return {r["strategy"]: r for r in load_accuracy(name)["rows"] if r["world_size"] == world_size}


def write_accuracy(path: str | Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write a table (atomically: the old file or the new one, never a torn one)."""
    for i, row in enumerate(rows):
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"accuracy table {path} (new rows): row {i}: {problem}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        f.write(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return path


def within(row: dict[str, Any] | None, budget: dict[str, float]) -> str | None:
    """Why a measured row breaks ``budget`` (None: it does not). A missing row breaks any
    budget on a measured metric: nothing measured, nothing promised."""
    for metric, bound in budget.items():
        if metric == "rel_error":
            continue  # per message, from the strategy's own error_bound
        if row is None:
            return f"no {metric} measured at this world size"
        value = row["ppl_change_hi"] if metric == "ppl_change" else row[metric]
        if value > bound:
            return f"{metric} {value:.3g} > {bound:.3g}"
    return None


def relative_error(algo: Any, op: str, numel: int, dtype: Any, world_size: int) -> float:
    """The most ``algo`` says its result may be off, relative to the magnitude of the inputs:
    max(error bound) / max(sum over ranks of |input|), on normal random inputs of the message's
    size (a fixed generator per rank). Exact algorithms: 0."""
    import torch

    if algo.exact:
        return 0.0
    inputs = [
        torch.randn(numel, generator=torch.Generator().manual_seed(r)).to(dtype)
        for r in range(world_size)
    ]
    bound = algo.error_bound(op, inputs, 0)
    scale = sum(x.double().abs() for x in inputs)
    return float(bound.max() / scale.max())


def admissible(
    algos: dict[str, Any],
    world_size: int,
    budget: dict[str, float] | None,
    accuracy: str | None,
    deterministic: bool,
) -> tuple[list[str], dict[str, str], str | None]:
    """Which of ``algos`` (label -> algorithm) a dispatcher may choose among: with
    ``deterministic``, those sharing one summation order that depends on neither message size
    nor batch (the most common such order; a tie goes to the earliest candidate's); within a
    ``budget`` of measured metrics, those whose accuracy-table row keeps it (exact ones
    always). Returns the kept labels, why each other one was dropped, and the kept order."""
    dropped: dict[str, str] = {}
    order = None
    if deterministic:
        orders = [a.summation_order for a in algos.values() if a.summation_order is not None]
        order = max(orders, key=lambda o: (orders.count(o), -orders.index(o)), default=None)
        for label, a in algos.items():
            if a.summation_order is None:
                dropped[label] = "its summation order depends on the message size"
            elif a.summation_order != order:
                dropped[label] = f"sums in {a.summation_order} order, not {order}"
    if budget:
        rows = accuracy_rows(accuracy, world_size) if accuracy else {}
        for label, a in algos.items():  # rows are keyed by the canonical label
            why = (
                None
                if a.exact
                else within(rows.get(strategy_label(*parse_strategy(label))), budget)
            )
            if why and label not in dropped:
                dropped[label] = why
    return [n for n in algos if n not in dropped], dropped, order
