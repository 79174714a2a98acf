"""Type checks of strategy options, read from their annotations (or defaults): a value of the
wrong type is refused before any rank starts, in words that say what was expected."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any


def type_hints(fn: Any) -> dict[str, Any]:
    """``fn``'s annotations, evaluated; {} where a plugin's cannot be (its checks then fall
    back to the defaults' types)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


_KINDS = {
    bool: ("true or false", (bool,)),
    int: ("an integer", (int,)),
    float: ("a number", (int, float)),
    str: ("a string", (str,)),
    list: ("a list", (list, tuple)),
    tuple: ("a list", (list, tuple)),
    dict: ("a mapping", (dict,)),
}


def type_problem(param: inspect.Parameter, value: Any) -> str | None:
    """What ``value`` should have been for option ``param`` (None: it fits): the annotation
    (``int``, ``int | None``, ``list[str] | None``, ...) or else the default's type."""
    ann = param.annotation
    if isinstance(ann, str) or ann is inspect.Parameter.empty or ann is Any:
        ann = type(param.default) if param.default is not None else None
    if ann is None:
        return None
    args = (
        typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType)
        else (ann,)
    )
    optional = type(None) in args
    kinds = [_KINDS.get(typing.get_origin(a) or a) for a in args if a is not type(None)]
    if not kinds or None in kinds:  # a type these checks do not know: the strategy's rules
        return None
    if value is None and optional:
        return None
    for _, types_ in kinds:
        if isinstance(value, types_) and not (isinstance(value, bool) and bool not in types_):
            return None
    what = " or ".join(dict.fromkeys(w for w, _ in kinds))
    return what + (" or null" if optional else "")
