"""``parallel.cpu_bind``: pin each rank, with every thread it has, to a set of CPU cores.

On a small host the scheduler's placement of the ranks decides a shared-memory exchange's time
(two ranks on one core take turns; on two cores they poll each other in step), so unpinned
timings wander by several times between runs. vLLM's CPU backend binds its threads for the
same reason. The binding covers the threads the library already started (gloo's workers,
created with the process group) and, through inheritance, every later one (a schedule's
progress thread, torch's intra-op pool).

Values: ``none`` (the scheduler places everything); ``spread`` (local rank r on the r-th block
of ``threads_per_rank`` cores this process may use, wrapping around); ``auto`` (the CPU
default: ``spread`` when every rank of this host gets cores of its own, else ``none``: pinning
more ranks than cores would only forbid the scheduler to balance them); or one core set per
rank, ``;``-separated, each a comma list of cores or ranges: ``"0;1"``, ``"0-3;4-7"``.

Measured here (2 cores, shm and naive at p = 2, 1-256 KiB, 10 runs each, interleaved;
docs/measurements.md): unpinned, the worst neighbouring-size median ratio was 1.7-5.5 and the
worst p90/median 2.8-135; pinned, 1.5-1.7 and 1.6-3.2 in 8 runs of 10 (the other two caught
a millisecond stall of a core, which a pinned rank cannot leave), and naive got faster, not
slower (median 270-460 us against 390-1250 us).
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
    if value in ("none", "spread", "auto"):
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


def cores_for(
    value: str, rank: int, allowed: set[int], ranks: int = 1, threads: int = 1
) -> set[int] | None:
    """The cores local ``rank`` of ``ranks`` on this host, ``threads`` busy threads each, runs
    on under ``value`` (None: unbound)."""
    cores = sorted(allowed)
    if value == "auto":
        value = "spread" if ranks * threads <= len(cores) else "none"
    if value == "none":
        return None
    if value == "spread":
        return {cores[(rank * threads + i) % len(cores)] for i in range(threads)}
    return parse_cpu_sets(value)[rank]


def bind_rank(value: str, rank: int, ranks: int = 1, threads: int = 1) -> set[int] | None:
    """Pin this process's every thread to local ``rank``'s cores; return them (None:
    unbound)."""
    cores = cores_for(value, rank, os.sched_getaffinity(0), ranks, threads)
    if cores is None:
        return None
    for tid in os.listdir("/proc/self/task"):  # gloo's threads exist already
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    return cores
