"""Built-in strategies, one file each; importing this package registers them all.

Algorithms (put one all-reduce on the wire): naive, tree, hierarchical, shm.
Schedules (decide when and how tensors are grouped; send through ``inner``): bucketed,
async_overlap, double_buffer, adaptive_threshold.
"""

from strategies import (  # noqa: F401  (imported for registration)
    adaptive_threshold,
    async_overlap,
    bucketed,
    double_buffer,
    hierarchical,
    naive,
    shm,
    tree,
)
