"""Private process groups for communicators, cached instead of destroyed.

Each communicator works on its own group so its traffic (possibly from a progress thread) never
interleaves with the caller's collectives. Groups are created with ``new_group``'s default global
synchronisation: every rank of the default group makes the same calls in the same order, members
or not. (Local synchronisation names a group after the ranks AND the number of groups the
calling process already has, so two members with different histories, say a node leader and a
plain rank, pick different names and hang; and a destroyed group's name comes back with its
stale rendezvous keys.) Groups are expensive to create (NCCL communicators most of all), so
closed communicators hand them back here and the next communicator over the same ranks reuses
one; every rank makes the same acquire/release calls, so every rank picks the same group. The
cache is dropped when the default group changes (a new ``init_process_group``): it is keyed
on the default group object itself, never on its ``id``, which a new group can reuse.
"""

from __future__ import annotations

import atexit
from datetime import timedelta

import torch.distributed as dist

_free: dict[tuple, list[dist.ProcessGroup]] = {}
# The default group the cache belongs to, held (not its id): while it is referenced here no
# new default group can get its address, so a new init_process_group is always recognised.
_world: list[dist.ProcessGroup | None] = [None]
# Bumped whenever the world changes or the cache is forgotten. The same on every rank, so a
# group released with the generation it was acquired in is cached or dropped alike everywhere,
# by members and by non-members (which all hold the one NON_GROUP_MEMBER stand-in).
_generation = [0]


def _key(ranks: list[int], backend: str, timeout_s: float) -> tuple:
    world = dist.group.WORLD
    if _world[0] is not world:
        _free.clear()
        _world[0] = world
        _generation[0] += 1
    return (tuple(ranks), backend, float(timeout_s))


def acquire_group(
    ranks: list[int], backend: str, timeout_s: float
) -> tuple[dist.ProcessGroup, int]:
    """A group over ``ranks`` used by nobody else (non-members get ``NON_GROUP_MEMBER``), and
    the generation to hand back with it.

    Collective over the default group: every rank calls it with the same ``ranks``.
    """
    key = _key(ranks, backend, timeout_s)
    free = _free.get(key)
    group = free.pop() if free else None
    if group is None:
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), backend=backend)
    return group, _generation[0]


def release_group(
    ranks: list[int], backend: str, timeout_s: float, group: dist.ProcessGroup, generation: int
) -> None:
    """Hand ``group`` back for reuse, unless its world has been destroyed since it was
    acquired (a communicator closed after ``destroy_process_group`` and a new init, or after
    :func:`forget_groups`): then the group is dead and is dropped, on every rank alike."""
    key = _key(ranks, backend, timeout_s)
    if generation == _generation[0]:
        _free.setdefault(key, []).append(group)


@atexit.register
def forget_groups() -> None:
    """Drop every cached group (and the default group held as the cache's key). Called before
    ``destroy_process_group`` and at exit, so that no process group outlives the interpreter's
    orderly shutdown: one destroyed during module teardown can abort the process (SIGABRT)."""
    _free.clear()
    _world[0] = None
    _generation[0] += 1
