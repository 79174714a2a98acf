"""Profile mode: a Chrome trace per rank of where the time goes (compute, copy, wait, wire).

``torch.profiler`` records every aten op (matmuls, copies, adds) and the backend's collectives
(``gloo:all_reduce``); :func:`span` adds commlab's own spans, ``commlab.<strategy>.blocked``
(the caller is blocked in the communicator: exposed communication) and
``commlab.<strategy>.reduce`` (a collective on the wire, on whichever thread runs it). Spans
cost one flag check (about 0.1 us) when no profiler is running, so they stay in the hot path.
Open ``trace-rank<r>.json`` in chrome://tracing or https://ui.perfetto.dev.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

_enabled = torch._C._autograd._profiler_enabled


def span(name: str):
    """A named span in the trace while a profiler runs; free otherwise."""
    return record_function(name) if _enabled() else nullcontext()


@contextmanager
def profiled(enabled: bool, out_dir: str | Path, rank: int, cuda: bool = False) -> Iterator[None]:
    """Profile the body on this rank and write ``<out_dir>/trace-rank<rank>.json``."""
    if not enabled:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(Path(out_dir) / f"trace-rank{rank}.json"))
