"""Built-in strategies, one file each, found like any plugin: through the ``commlab.strategies``
entry points in commlab's ``pyproject.toml`` (importing this package registers nothing).

Algorithms (put one all-reduce on the wire): naive, tree, hierarchical, shm.
Schedules (decide when and how tensors are grouped; send through ``inner``): bucketed,
async_overlap, double_buffer, adaptive_threshold.
"""
