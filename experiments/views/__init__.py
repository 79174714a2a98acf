"""Report views: a study's own reading of a sweep, registered by name.

``python -m experiments.report <sweep dir> --view NAME [--out DIR]`` collects the sweep's rows
(the same rows as the standard report: the inference jobs' runs, then the bench jobs' sizes) and
hands them to view ``NAME``, which writes its tables,
plots and data into ``DIR``. A view is one function; it shares the report's table and plot
helpers (:mod:`experiments.report`) instead of keeping its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

View = Callable[[list[dict[str, Any]], Path], list[Path]]
VIEWS: dict[str, str] = {  # name -> the module that defines ``view``
    "fusion_overlap": "experiments.views.fusion_overlap",
    "quantized": "experiments.views.quantized",
    "selection": "experiments.views.selection",
    "sequence_parallel": "experiments.views.sequence_parallel",
    "shm_modes": "experiments.views.shm_modes",
}


def get_view(name: str) -> View:
    if name not in VIEWS:
        raise ValueError(f"unknown report view {name!r}; available: {sorted(VIEWS)}")
    return importlib.import_module(VIEWS[name]).view
