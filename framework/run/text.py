"""Text prompts: encode ``workload.text`` with the checkpoint's own tokenizer, decode the output.

A Hugging Face checkpoint directory usually holds ``tokenizer.json`` (the ``tokenizers``
format every fast tokenizer saves); it carries the model's normaliser, pre-tokeniser and
post-processor, so encoding adds the BOS token exactly as the model was trained to see it.
Nothing is downloaded: a checkpoint without ``tokenizer.json`` is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(checkpoint: str) -> Any:
    path = Path(checkpoint) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"workload.text needs a tokenizer: {path} does not exist (save the tokenizer "
            f"with the checkpoint, or pass token ids with workload.prompts)"
        )
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library's words ("expected ident at line 1") name no file
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def encode(checkpoint: str, texts: list[str]) -> list[list[int]]:
    tok = load_tokenizer(checkpoint)
    return [tok.encode(t).ids for t in texts]


def decode(checkpoint: str, sequences: list[list[int]]) -> list[str]:
    tok = load_tokenizer(checkpoint)
    return [tok.decode(ids, skip_special_tokens=True) for ids in sequences]
