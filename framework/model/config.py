"""Model shapes: :class:`ModelConfig` and the named presets (tiny, small, Llama-3 8B/70B)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """Shape of a Llama-family model (full, unsharded sizes).

    ``head_dim`` is resolved once, in ``__post_init__``, to ``hidden_size // num_heads``
    when given as None; ``dataclasses.replace`` keeps the resolved value, so pass
    ``head_dim=None`` explicitly if you change hidden_size/num_heads and want it re-derived.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            # RoPE rotates pairs of channels, so the head dimension must be even.
            raise ValueError(f"head_dim must be a positive even int, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )

    @property
    def hd(self) -> int:
        """Resolved head dimension (typed as int, unlike the ``head_dim`` field)."""
        if self.head_dim is None:  # unreachable after __post_init__; for type checkers
            raise ValueError("head_dim is unresolved")
        return self.head_dim

    def validate_tp(self, tp_size: int) -> None:
        """Raise ValueError unless every rank gets at least one query head and one MLP channel.

        Any such TP size works: heads and channels split into floor/ceil blocks and KV heads
        are replicated where a query group spans ranks (framework.model.sharding). vLLM and
        Megatron-LM refuse a TP size that does not divide the head count; commlab does not."""
        if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
        if tp_size > self.num_heads:
            raise ValueError(
                f"tp_size={tp_size} is larger than num_heads={self.num_heads}: every rank "
                f"needs at least one query head (TP size larger than the head count)"
            )
        if tp_size > self.intermediate_size:
            raise ValueError(
                f"tp_size={tp_size} is larger than intermediate_size={self.intermediate_size}: "
                f"every rank needs at least one MLP channel"
            )

    @property
    def num_params(self) -> int:
        """Total parameter count of the full (unsharded) model."""
        from framework.model.sharding import full_param_shapes  # sharding imports config

        return sum(math.prod(s) for s in full_param_shapes(self).values())


PRESETS: dict[str, ModelConfig] = {
    # Tests: 24 heads / 12 kv heads / 384 intermediate split evenly over TP 2, 3 and 4.
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=192,
        intermediate_size=384,
        num_layers=2,
        num_heads=24,
        num_kv_heads=12,
        head_dim=8,
        max_seq_len=128,
    ),
    # CPU benchmarks: ~100M parameters (embedding tied with lm_head).
    "small": ModelConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_seq_len=1024,
        tie_word_embeddings=True,
    ),
    # Exact Llama-3 shapes; use dataclasses.replace(cfg, num_layers=2) for a cheap slice.
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_seq_len=8192,
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_seq_len=8192,
    ),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Return a copy of preset ``name`` with ``overrides`` applied (e.g. num_layers=2)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)
