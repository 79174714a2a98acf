"""Convert a llama.cpp GGUF file into a Hugging Face Llama checkpoint directory.

A GGUF file holds a model's weights (often block-quantized), its hyperparameters and its
tokenizer. :func:`convert_gguf` dequantizes every tensor to float32 with the ``gguf`` package,
undoes llama.cpp's q/k row permutation (``convert_hf_to_gguf.py`` reorders RoPE pairs for its
own kernels; transformers' GGUF loader undoes it the same way), renames tensors to HF's names,
and writes ``model.safetensors``, ``config.json`` and ``tokenizer.json``: the directory
:func:`framework.model.checkpoint.load_hf_checkpoint` and transformers both read. It does not go
through transformers (whose GGUF-loaded models refuse ``save_pretrained``); the tests check the
result against transformers' own GGUF loader. A file without ``output.weight`` has tied
embeddings (the head reuses ``token_embd``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = "pip install 'commlab[models]' (or: pip install gguf)"

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special (added) tokens


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading a GGUF model needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _reader(path: Path) -> Any:
    gguf = _gguf_module()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated header: the reader's words name no file
        raise ValueError(f"{path} is not a valid GGUF file: {e}") from None


def _field(reader: Any, key: str, path: Path, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _float32_value(x: float) -> float:
    """The shortest decimal of a float32 (GGUF stores eps as float32: 1e-5, not 9.99e-6)."""
    import numpy as np

    return float(str(np.float32(x)))


def hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """The HF ``config.json`` of a Llama GGUF; refuses other architectures."""
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not a Llama model (need 'llama')")
    heads = int(_field(reader, "llama.attention.head_count", path))
    hidden = int(_field(reader, "llama.embedding_length", path))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": int(_field(reader, "llama.vocab_size", path, len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_field(reader, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", path, heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", path, hidden // heads)),
        "rope_theta": _float32_value(_field(reader, "llama.rope.freq_base", path, 10000.0)),
        "rms_norm_eps": _float32_value(
            _field(reader, "llama.attention.layer_norm_rms_epsilon", path)
        ),
        "max_position_embeddings": int(_field(reader, "llama.context_length", path)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", path, None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", path, None),
        "torch_dtype": "float32",
    }


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: rows of each head go from interleaved RoPE pairs back to
    HF's rotate-half halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_state_dict(reader: Any, config: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 under its HF name."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise ValueError(f"{path}: unexpected tensor {t.name!r} for a Llama model")
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        elif t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        elif t.name == "rope_freqs.weight":
            raise ValueError(f"{path}: scaled RoPE (rope_freqs) is not supported")
        else:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a Llama model")
        # GGUF lists dims fastest-first; dequantize returns the numpy (row-major) shape
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


# llama.cpp pre-tokenizer names whose split is GPT-2's byte-level regex (others, Llama-3's
# among them, split digits and words differently: refused rather than tokenised wrongly)
_GPT2_SPLIT = ("gpt2", "smollm", "default")


def hf_tokenizer(reader: Any, path: Path) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata: the ``gpt2`` model with
    GPT-2's pre-tokenizer split (SmolLM's); control tokens become special added tokens, and a
    file that asks for a BOS token gets it prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (need 'gpt2' BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in _GPT2_SPLIT:
        raise ValueError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: {list(_GPT2_SPLIT)})"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    types = _field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(
        BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            continuing_subword_prefix="",
            end_of_word_suffix="",
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, k in enumerate(types) if k in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = _field(reader, "tokenizer.ggml.bos_token_id", path, None)
    if _field(reader, "tokenizer.ggml.add_bos_token", path, False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], int(bos))]
        )
    return tok


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the HF checkpoint of ``gguf_path`` into ``out_dir`` (created; replaced only as a
    whole: the files are written to a temporary sibling and renamed into place, so a reader
    never sees half a checkpoint and two converting processes cannot mix their files)."""
    from safetensors.torch import save_file

    src, dest = Path(gguf_path), Path(out_dir)
    reader = _reader(src)
    config = hf_config(reader, src)
    tokenizer = hf_tokenizer(reader, src)
    state = hf_state_dict(reader, config, src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "SOURCE").write_text(f"{src.name}\n")
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first: keep its (identical) copy
            if not (dest / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
