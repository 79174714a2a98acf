"""``parallel.cpu_bind``: pin each rank, with every thread it has, to a set of CPU cores.

On a small host the scheduler's placement of the ranks decides a shared-memory exchange's time
(two ranks on one core take turns; on two cores they poll each other in step), so unpinned
timings wander by several times between runs. vLLM's CPU backend binds its threads for the
same reason. The binding covers the threads the library already started (gloo's workers,
created with the process group) and, through inheritance, every later one (a schedule's
progress thread, torch's intra-op pool).

Values: ``none`` (the scheduler places everything), ``spread`` (rank r on the r-th core this
process may use, modulo their number), or one core set per rank, ``;``-separated, each a
comma list of cores or ranges: ``"0;1"``, ``"0-3;4-7"``.
"""

from __future__ import annotations

import os


def parse_cpu_sets(text: str) -> list[set[int]]:
    """``"0,2-3;1"`` -> ``[{0, 2, 3}, {1}]`` (ValueError on a malformed or empty set)."""
    sets = []
    for part in text.split(";"):
        cores: set[int] = set()
        for item in part.split(","):
            item = item.strip()
            if "-" in item:
                lo, hi = (int(v) for v in item.split("-"))
                if hi < lo:
                    raise ValueError(f"range {item!r} runs backwards")
                cores.update(range(lo, hi + 1))
            else:
                cores.add(int(item))
        if not cores or min(cores) < 0:
            raise ValueError(f"core set {part!r} is empty or negative")
        sets.append(cores)
    return sets


def cpu_bind_problem(value: str, world_size: int) -> str | None:
    """Why ``parallel.cpu_bind=value`` cannot work for ``world_size`` ranks here, or None."""
    if value in ("none", "spread"):
        return None
    try:
        sets = parse_cpu_sets(value)
    except ValueError as e:
        return f"parallel.cpu_bind={value!r}: {e} (none, spread, or '0;1' style core sets)"
    if len(sets) != world_size:
        return f"parallel.cpu_bind={value!r} gives {len(sets)} core sets for {world_size} ranks"
    allowed = os.sched_getaffinity(0)
    outside = sorted(set().union(*sets) - allowed)
    if outside:
        return f"parallel.cpu_bind={value!r}: cores {outside} are not among this host's {allowed}"
    return None


def cores_for(value: str, rank: int, allowed: set[int]) -> set[int] | None:
    """The cores ``rank`` runs on under ``value`` (None: unbound)."""
    if value == "none":
        return None
    if value == "spread":
        cores = sorted(allowed)
        return {cores[rank % len(cores)]}
    return parse_cpu_sets(value)[rank]


def bind_rank(value: str, rank: int) -> set[int] | None:
    """Pin this process's every thread to ``rank``'s cores; return them (None: unbound)."""
    cores = cores_for(value, rank, os.sched_getaffinity(0))
    if cores is None:
        return None
    for tid in os.listdir("/proc/self/task"):  # gloo's threads exist already
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    return cores
