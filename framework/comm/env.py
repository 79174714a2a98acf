"""What the launcher (torchrun, SLURM) says about this process's place in the job.

Read by strategies (``hierarchical``'s node size) and by the run machinery alike, so it lives
in the communication core, which imports nothing else from ``framework``.
"""

from __future__ import annotations

import os
import re


def launched_externally() -> bool:
    """True under torchrun (TorchElastic) or a multi-task SLURM step: use their processes."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def is_rank_zero() -> bool:
    """False in the non-zero processes of a torchrun/SLURM launch (they neither print nor log,
    nor say what the whole job should hear once)."""
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    return not launched_externally() or rank == 0


def ranks_per_node_from_env() -> int | None:
    """Ranks per node as the launcher describes it, or None outside torchrun/SLURM.

    torchrun sets LOCAL_WORLD_SIZE; SLURM writes SLURM_NTASKS_PER_NODE as "4" or "4(x2)".
    """
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    m = re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", ""))
    return int(m.group()) if m else None
