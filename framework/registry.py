"""The strategy registry: a plain dict, a decorator that refuses duplicates, and a builder.

Built-in strategies live in the ``strategies`` package; third-party ones are discovered through
the ``commlab.strategies`` entry-point group (the value may be a module that registers on
import, or a Communicator class, which is registered under the entry point's name).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from importlib.metadata import entry_points
from typing import Any

import torch.distributed as dist

from framework.communicator import Communicator

ENTRY_POINT_GROUP = "commlab.strategies"
_REGISTRY: dict[str, type[Communicator]] = {}
_discovered = False


def register_strategy(name: str):
    """Class decorator: ``@register_strategy("naive")``. A duplicate name is an error."""

    def deco(cls: type[Communicator]) -> type[Communicator]:
        if not (isinstance(cls, type) and issubclass(cls, Communicator)):
            raise TypeError(f"register_strategy({name!r}) needs a Communicator subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"strategy {name!r} is already registered by "
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def discover(force: bool = False) -> None:
    """Import built-ins and load ``commlab.strategies`` entry points (again if ``force``)."""
    global _discovered
    if _discovered and not force:
        return
    _discovered = True
    importlib.import_module("strategies")  # built-ins register on import
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY and ep.value.split(":")[0] == _REGISTRY[ep.name].__module__:
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the built-ins down with it
            warnings.warn(f"commlab: could not load strategy plugin {ep.name!r}: {e}",
                          stacklevel=2)
            continue
        if isinstance(obj, type) and issubclass(obj, Communicator) and ep.name not in _REGISTRY:
            register_strategy(ep.name)(obj)


def available_strategies() -> list[str]:
    discover()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Communicator]:
    discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def inner_algorithms() -> list[str]:
    """Strategies a schedule can send its collectives through (option ``inner``)."""
    from framework.algorithm import Algorithm

    return [n for n in available_strategies() if issubclass(_REGISTRY[n], Algorithm)]


def strategy_options(name: str) -> dict[str, Any]:
    """Keyword-only options of a strategy and their defaults (base options included)."""
    cls = get_strategy(name)
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass) or not issubclass(klass, Communicator):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and not p.name.startswith("_"):
                out[p.name] = p.default
    for name in getattr(cls, "fixed_options", ()):  # set by the subclass, not by users
        out.pop(name, None)
    return out


def build_communicator(
    name: str, group: dist.ProcessGroup | None = None, **options: Any
) -> Communicator:
    """Build strategy ``name`` on ``group`` (default WORLD). Collective: call on every rank."""
    cls = get_strategy(name)
    known = strategy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no option(s) {unknown}; its options are {sorted(known)}"
        )
    return cls(group, **options)
