"""The Llama-family TP model: shapes, sharding layout, layers, the module, generation, loading.

It never imports the communication core: a layer takes its communicator through the small
:class:`~framework.model.layers.AllReducer` protocol.
"""

from framework.model.config import PRESETS, ModelConfig, get_config
from framework.model.layers import AllReduceHandle, AllReducer, split_batch
from framework.model.llama import TPLlama
from framework.model.sharding import full_param_shapes, param_shard

__all__ = [
    "PRESETS",
    "AllReduceHandle",
    "AllReducer",
    "ModelConfig",
    "TPLlama",
    "full_param_shapes",
    "get_config",
    "param_shard",
    "split_batch",
]
