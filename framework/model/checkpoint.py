"""Load Hugging Face Llama checkpoints (config.json + safetensors) into a TPLlama rank.

Each rank reads only its own slice of every sharded weight through
``safe_open(...).get_slice(name)[rows]``, so a rank never materialises a full
column/row-parallel matrix; replicated weights (embedding, norms, lm_head) are read
whole. The slicing layout comes from ``framework.model.param_shard``, the same function
``init_random`` and ``load_state_dict_full`` use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from framework.model.config import ModelConfig
from framework.model.layers import AllReducer
from framework.model.llama import TPLlama
from framework.model.sharding import full_param_shapes

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"checkpoint path {root} is not a directory")
    return root


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        return data
    raise ValueError(f"{file} must hold a JSON object, not {type(data).__name__}")


def config_from_hf(path: str | os.PathLike[str]) -> ModelConfig:
    """Translate a HF Llama ``config.json`` into a ModelConfig, rejecting features this
    model does not implement (biases, non-SiLU activations, scaled RoPE variants) rather
    than silently producing wrong logits."""
    file = _checkpoint_dir(path) / _CONFIG
    hf = _read_json(file)
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{file}: model_type is {model_type!r}, only 'llama' is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{file}: hidden_act {hf['hidden_act']!r} unsupported (need 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{file}: {flag}=true is not supported")
    # transformers >= 5 nests RoPE settings in rope_parameters; older files use
    # rope_theta / rope_scaling at top level.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{file}: rope type {rope_type!r} is not supported (only default)")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if k not in hf
    ]
    if missing:
        raise ValueError(f"{file}: missing required field(s) {missing}")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _weight_files(root: Path) -> dict[str, Path] | Path:
    """Tensor name -> file from the shard index, or the single safetensors file."""
    index = root / _INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        return {name: root / file for name, file in weight_map.items()}
    single = root / _SINGLE
    if single.is_file():
        return single
    raise FileNotFoundError(f"{root} has neither {_SINGLE} nor {_INDEX}")


def load_hf_checkpoint(
    path: str | os.PathLike[str],
    comm: AllReducer,
    tp_rank: int = 0,
    tp_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_layers: int | None = None,
) -> TPLlama:
    """Build rank ``tp_rank`` of a TPLlama from a HF Llama checkpoint directory.

    ``num_layers`` keeps only the first N decoder layers (cheap experiments on big
    checkpoints); the later layers' tensors are never read.
    """
    root = _checkpoint_dir(path)
    cfg = config_from_hf(root)
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers={num_layers} must be in [1, {cfg.num_layers}] for {root}")
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    cfg.validate_tp(tp_size)
    files = _weight_files(root)
    expected = full_param_shapes(cfg)
    model = TPLlama(cfg, comm, tp_rank=tp_rank, tp_size=tp_size, dtype=dtype, device=device)

    with contextlib.ExitStack() as stack:
        handles: dict[Path, tuple[Any, set[str]]] = {}  # file -> (open handle, its names)

        def open_file(file: Path) -> tuple[Any, set[str]]:
            if file not in handles:
                if not file.is_file():
                    raise FileNotFoundError(f"safetensors file {file} not found")
                try:
                    handle = stack.enter_context(safe_open(file, framework="pt"))
                except SafetensorError as exc:
                    raise ValueError(f"{file} is not a valid safetensors file: {exc}") from exc
                handles[file] = (handle, set(handle.keys()))
            return handles[file]

        def fetch(name: str, shard: tuple[int, int, int] | None) -> Tensor:
            file = files.get(name) if isinstance(files, dict) else files
            handle, names = (None, set()) if file is None else open_file(file)
            if handle is None or name not in names:
                where = file if file is not None else root / _INDEX
                raise ValueError(f"tensor {name!r} not found in {where}")
            piece = handle.get_slice(name)
            shape = tuple(piece.get_shape())
            if shape != expected[name]:
                raise ValueError(
                    f"{file}: tensor {name!r} has shape {shape}, but "
                    f"{root / _CONFIG} implies {expected[name]}"
                )
            try:
                if shard is None:
                    value = piece[:]
                elif shard[0] == 0:
                    value = piece[shard[1] : shard[2]]  # rows only: contiguous read
                else:
                    value = piece[:, shard[1] : shard[2]]
            except SafetensorError as exc:
                raise ValueError(f"{file}: cannot read tensor {name!r}: {exc}") from exc
            return value.to(dtype)

        model.load_sharded(fetch)
    return model
