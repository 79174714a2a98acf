"""The strategy registry: a plain dict, a decorator that refuses duplicates, and a builder.

Every strategy, built-in or third-party, is found the same way: through the
``commlab.strategies`` entry-point group (commlab's own ``pyproject.toml`` declares the
built-ins). The value may be a module that registers on import or a Communicator class, which
is registered under the entry point's name. Entry points are loaded lazily: ``get_strategy``
imports only the one it needs; listing them imports all. A plugin that fails to import is
remembered with its reason, warned about, named in ``get_strategy``'s error, and hides nothing
else. Strategies registered in-process with ``@register_strategy`` need no entry point.
"""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch.distributed as dist
import yaml

from framework.comm.communicator import Communicator

ENTRY_POINT_GROUP = "commlab.strategies"
_REGISTRY: dict[str, type[Communicator]] = {}
_EPS: dict[str, EntryPoint] = {}  # entry points by name, read once (lazily)
_eps_read = False
_FAILED: dict[str, str] = {}  # entry points that failed to load -> why


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
    """Read the ``commlab.strategies`` entry points (again if ``force``); loads nothing."""
    global _eps_read
    if _eps_read and not force:
        return
    _EPS.clear()
    _FAILED.clear()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _EPS.setdefault(ep.name, ep)
    _eps_read = True


def _load(name: str) -> None:
    """Import entry point ``name`` once; a failure is remembered with its reason."""
    ep = _EPS.get(name)
    if ep is None or name in _REGISTRY or name in _FAILED:
        return
    try:
        obj = ep.load()
    except Exception as e:  # a broken plugin must not take the others down with it
        _FAILED[name] = f"{ep.value}: {type(e).__name__}: {e}"
        warnings.warn(
            f"commlab: strategy plugin {name!r} could not be loaded: {_FAILED[name]}", stacklevel=3
        )
        return
    if isinstance(obj, type) and issubclass(obj, Communicator) and name not in _REGISTRY:
        register_strategy(name)(obj)
    elif name not in _REGISTRY:
        _FAILED[name] = f"{ep.value}: loaded, but registered no strategy named {name!r}"


def _load_all() -> None:
    discover()
    for name in list(_EPS):
        _load(name)


def available_strategies() -> list[str]:
    """Every strategy that loads: registered ones and every loadable entry point."""
    _load_all()
    return sorted(_REGISTRY)


def failed_strategies() -> dict[str, str]:
    """Entry points that failed to load, with the reason (shown in ``get_strategy``'s error)."""
    _load_all()
    return dict(_FAILED)


def get_strategy(name: str) -> type[Communicator]:
    """The class registered as ``name``, loading only its own entry point if needed."""
    if name not in _REGISTRY:
        discover()
        _load(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    _load_all()
    msg = f"unknown strategy {name!r}; available: {sorted(_REGISTRY)}"
    if _FAILED:
        msg += "; plugins that failed to load: " + "; ".join(
            f"{n} ({why})" for n, why in sorted(_FAILED.items())
        )
    raise ValueError(msg)


def inner_algorithms() -> list[str]:
    """Strategies a schedule can send its collectives through (option ``inner``)."""
    from framework.comm.algorithm import Algorithm

    return [n for n in available_strategies() if issubclass(_REGISTRY[n], Algorithm)]


def exact_algorithms(backend: str) -> list[str]:
    """The exact algorithms that run on ``backend``: what ``auto`` chooses among by default
    and what ``bench.tune`` times (``auto`` itself, which dispatches to them, left out)."""
    return [
        n
        for n in inner_algorithms()
        if n != "auto" and _REGISTRY[n].exact and backend in _REGISTRY[n].supports
    ]


def strategy_options(name: str) -> dict[str, Any]:
    """Keyword-only options of a strategy and their defaults (base options included)."""
    return {k: p.default for k, p in get_strategy(name).declared_options().items()}


def parse_strategy(label: str) -> tuple[str, dict[str, Any]]:
    """``"auto:table=this_host,tune_iters=5"`` -> ("auto", {"table": "this_host", ...});
    options holding lists are written as a YAML mapping: ``"auto:{candidates: [naive, tree]}"``.
    The one way a strategy and its options are written as a string: ``infer``'s ``compare``,
    ``bench.compare``, ``auto``'s candidates and the accuracy tables' rows."""
    name, _, rest = label.partition(":")
    if rest.strip().startswith("{"):
        return name.strip(), dict(yaml.safe_load(rest))
    opts = {}
    for kv in filter(None, rest.split(",")):
        key, _, value = kv.partition("=")
        opts[key.strip()] = yaml.safe_load(value)
    return name.strip(), opts


def strategy_label(name: str, options: dict[str, Any]) -> str:
    """The canonical string of a strategy and its (scalar) options, sorted by key:
    ``quantized:block=32,fmt=int8``; :func:`parse_strategy` reads it back."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={options[k]}" for k in sorted(options))


def build_inner(owner: Communicator, name: str, **options: Any) -> Communicator:
    """Algorithm ``name`` as a part of ``owner`` (a schedule's or composition's ``inner``, a
    dispatcher's candidate): it shares ``owner``'s private group and counters (its traffic
    shows in ``owner.stats``, uncounted twice), and ``owner``'s ``timeout_s`` and
    ``validate``. Collective: every rank builds the same parts in the same order."""
    return get_strategy(name)(
        owner.group,
        _parent=owner,
        timeout_s=owner.timeout_s,
        validate=owner.validate,
        **options,
    )


def build_communicator(
    name: str, group: dist.ProcessGroup | None = None, **options: Any
) -> Communicator:
    """Build strategy ``name`` on ``group`` (default WORLD). Collective: call on every rank.
    Its options are checked first (``Communicator.check_options``), before any rank waits."""
    return get_strategy(name)(group, **options)
