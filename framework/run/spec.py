"""Typed run configuration, shared by the runner and Hydra's ConfigStore (structured configs).

``validate_run`` checks everything that can be checked before a rank is spawned, so a bad run
fails in a second with one clear message instead of on every rank (or in a hang).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from framework.comm.registry import available_strategies, get_strategy, parse_strategy
from framework.model import ModelConfig, get_config
from framework.run.binding import cpu_bind_problem
from framework.run.faults import KINDS, FaultSpec


class ConfigError(ValueError):
    """A run configuration that cannot work; the message lists every problem found."""


@dataclass
class ModelSpec:
    # a shape preset (framework.model.PRESETS: random weights) or a trained model
    # (framework.model.trained.TRAINED, e.g. smollm2: converted once into cache_dir)
    preset: str = "tiny"
    checkpoint: str | None = None  # a Hugging Face Llama directory; overrides the preset
    cache_dir: str | None = None  # trained models' cache; None: $COMMLAB_CACHE, ~/.cache/commlab
    num_layers: int | None = None  # keep only the first N layers (realistic shapes, less work)
    dtype: str = "float32"
    max_seq_len: int | None = None  # context length (KV cache size); None: the preset's


@dataclass
class WorkloadSpec:
    batch_size: int = 4
    prompt_len: int = 16
    new_tokens: int = 16
    micro_batches: int = 1
    prompts: str | None = None  # JSON list of token-id lists; else drawn from the seed
    text: list[str] | None = None  # prompts as text, encoded with the checkpoint's tokenizer
    temperature: float = 0.0
    top_k: int = 0
    warmup_tokens: int = 2
    background_load: int = 0  # busy processes on the host during the run (a loaded host)
    # exact: after the measured run, decode again with exact communication (naive) and with
    # the strategy teacher-forced on the exact tokens: results.json gains a numerics block
    reference: str = "none"
    # with reference=exact: also perplexity on this fixed text, teacher-forced, against exact
    # communication (framework.run.perplexity.EVAL_TEXTS: python-docs); its first
    # eval_tokens + 1 tokens, eval_chunk at a time
    eval_text: str | None = None
    eval_tokens: int = 2048
    eval_chunk: int = 256
    # measured runs after the one warm-up; times are their medians, with the spread of every
    # timed metric in results.json (framework.run.spread)
    repeats: int = 1


@dataclass
class ParallelSpec:
    world_size: int = 2
    backend: str = "auto"  # auto: nccl when CUDA devices are present, else gloo
    timeout_s: float = 60.0  # every process group; torch's 30-minute default is never used
    threads_per_rank: int = 1  # ranks oversubscribe small hosts; one thread each by default
    # where tensors live: auto = cuda with nccl, else cpu; cuda with gloo shares the host's
    # GPUs among the ranks (rank i on GPU i mod count: several processes may share one)
    device: str = "auto"
    cuda_graphs: bool = False  # capture the decode step in a CUDA graph (graph-safe strategies)
    # split the residual stream over tokens (reduce-scatter + all-gather instead of
    # all-reduce) in every forward of at least sp_min_tokens tokens (batch x new tokens)
    sequence_parallel: bool = False
    sp_min_tokens: int = 0
    # pin each rank's threads to cores: auto | none | spread | "0;1" (framework.run.binding)
    cpu_bind: str = "auto"


@dataclass
class RunSpec:
    strategy: str = "naive"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    model: ModelSpec = field(default_factory=ModelSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    seed: int = 0
    out_dir: str = "."
    fault: FaultSpec = field(default_factory=FaultSpec)  # reliability tests only
    profile: bool = False  # torch.profiler Chrome trace of the measured run, per rank
    # more strategies measured in the same job, on the same ranks and weights, interleaved
    # with the job's own in every one of workload.repeats rounds: "name",
    # "name:key=value,key=value", or "all" (every other registered strategy)
    compare: list[str] | None = None


REFERENCES = ("none", "exact")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_backend(parallel: ParallelSpec) -> str:
    """auto: NCCL when CUDA devices are present and the tensors may be on them, else gloo."""
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() and parallel.device != "cpu" else "gloo"


def resolve_device(parallel: ParallelSpec) -> str:
    if parallel.device != "auto":
        return parallel.device
    return "cuda" if resolve_backend(parallel) == "nccl" else "cpu"


def checkpoint_dir(spec: ModelSpec) -> str | None:
    """The HF checkpoint the run loads: ``model.checkpoint``, or a trained preset's cached
    conversion (made on first use); None for a random-weight preset."""
    if spec.checkpoint:
        return spec.checkpoint
    from framework.model.trained import TRAINED, trained_checkpoint

    if spec.preset in TRAINED:
        return str(trained_checkpoint(spec.preset, spec.cache_dir))
    return None


def model_config(spec: ModelSpec) -> ModelConfig:
    checkpoint = checkpoint_dir(spec)
    if checkpoint:
        from framework.model.checkpoint import config_from_hf

        cfg = config_from_hf(checkpoint)
    else:
        cfg = get_config(spec.preset)
    if spec.num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=min(spec.num_layers, cfg.num_layers))
    if spec.max_seq_len is not None:
        cfg = dataclasses.replace(cfg, max_seq_len=spec.max_seq_len)
    return cfg


def load_prompts(spec: RunSpec, vocab_size: int) -> list[list[int]]:
    w = spec.workload
    if w.text:
        from framework.run.text import encode

        checkpoint = checkpoint_dir(spec.model)
        if not checkpoint:
            raise ConfigError(
                "workload.text needs a model with a tokenizer (model=smollm2, or "
                "model.checkpoint=<HF directory>)"
            )
        prompts = encode(checkpoint, list(w.text))
        if not all(prompts):
            raise ConfigError("workload.text: a prompt encodes to no tokens")
        return prompts
    if w.prompts:
        try:
            with open(w.prompts) as f:
                prompts = json.load(f)
        except ValueError as e:
            raise ConfigError(f"workload.prompts: {w.prompts} is not JSON ({e})") from None
        if not (
            isinstance(prompts, list)
            and prompts
            and all(isinstance(p, list) and p for p in prompts)
        ):
            raise ConfigError(
                f"workload.prompts: {w.prompts} must hold a JSON list of non-empty token-id lists"
            )
        for row, prompt in enumerate(prompts):
            bad = [t for t in prompt if not _token_id(t, vocab_size)]
            if bad:
                raise ConfigError(
                    f"workload.prompts: {w.prompts}: prompt {row} holds {bad[:5]}; token ids "
                    f"are integers in [0, {vocab_size})"
                )
        return prompts
    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(1, vocab_size, (w.batch_size, w.prompt_len), generator=g).tolist()


def eval_ids(spec: RunSpec) -> tuple[list[int], str]:
    """The evaluation text's first ``eval_tokens + 1`` token ids and its SHA-256."""
    from framework.run.perplexity import eval_text
    from framework.run.text import encode

    w = spec.workload
    text, digest = eval_text(w.eval_text)
    checkpoint = checkpoint_dir(spec.model)
    if not checkpoint:
        raise ValueError(
            "workload.eval_text needs a model with a tokenizer (model=smollm2, or "
            "model.checkpoint=<HF directory>)"
        )
    ids = encode(checkpoint, [text])[0][: w.eval_tokens + 1]
    if len(ids) < w.eval_tokens + 1:
        raise ValueError(
            f"workload.eval_text={w.eval_text} holds {len(ids)} tokens, fewer than "
            f"workload.eval_tokens + 1 = {w.eval_tokens + 1}"
        )
    return ids, digest


def _check_eval_text(spec: RunSpec, context: int) -> None:
    eval_ids(spec)
    if spec.workload.eval_tokens > context:
        raise ValueError(
            f"workload.eval_tokens={spec.workload.eval_tokens} exceeds the model context {context}"
        )


def _token_id(t: Any, vocab_size: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size


def run_strategies(spec: RunSpec) -> list[tuple[str, dict[str, Any]]]:
    """What the job measures: its own strategy first, then ``compare`` (``all``: every other
    registered strategy with its default options, in name order)."""
    out = [(spec.strategy, dict(spec.strategy_options))]
    for label in spec.compare or []:
        if label == "all":
            out += [(n, {}) for n in available_strategies() if n != spec.strategy]
        else:
            out.append(parse_strategy(label))
    return out


def strategy_problems(name: str, options: dict[str, Any]) -> list[str]:
    """What is wrong with a strategy name and its options (empty when nothing is): the
    strategy's own checks (``Communicator.check_options``, which its constructor runs too),
    loading only the plugins the run names."""
    try:
        get_strategy(name).check_options(**options)
    except ValueError as e:
        return [str(e)]
    return []


def parallel_problems(p: ParallelSpec) -> list[str]:
    """What is wrong with the parallel settings on this host (empty when nothing is)."""
    problems = []
    if p.world_size <= 0:
        problems.append(f"parallel.world_size must be > 0, got {p.world_size}")
    if p.timeout_s <= 0:
        problems.append(f"parallel.timeout_s must be > 0, got {p.timeout_s}")
    if p.threads_per_rank < 1:
        problems.append(f"parallel.threads_per_rank must be >= 1, got {p.threads_per_rank}")
    if p.sp_min_tokens < 0:
        problems.append(f"parallel.sp_min_tokens must be >= 0, got {p.sp_min_tokens}")
    bind = cpu_bind_problem(p.cpu_bind, p.world_size)
    if bind is not None:
        problems.append(bind)
    backend = resolve_backend(p)
    if backend not in ("gloo", "nccl"):
        problems.append(f"parallel.backend must be auto, gloo or nccl, got {p.backend!r}")
    elif backend == "nccl" and torch.cuda.device_count() < max(p.world_size, 1):
        problems.append(
            f"parallel.backend=nccl needs {p.world_size} CUDA devices, this host "
            f"has {torch.cuda.device_count()}"
        )
    device = resolve_device(p)
    if device not in ("cpu", "cuda"):
        problems.append(f"parallel.device must be auto, cpu or cuda, got {p.device!r}")
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append("parallel.device=cuda needs a CUDA device; this host has none")
    elif device == "cpu" and backend == "nccl":
        problems.append("parallel.device=cpu cannot run on nccl (CUDA tensors only); use gloo")
    if p.cuda_graphs and device != "cuda":
        problems.append(f"parallel.cuda_graphs=true needs CUDA tensors; this run is on {device}")
    return problems


def graph_problems(strategy: str, options: dict[str, Any], p: ParallelSpec) -> list[str]:
    """A CUDA graph can only capture a strategy whose collectives are all graph-safe (an
    unknown strategy is :func:`strategy_problems`'s to report)."""
    if not p.cuda_graphs:
        return []
    try:
        cls = get_strategy(strategy)
    except ValueError:
        return []
    if options.get("validate"):
        return [
            "parallel.cuda_graphs=true with strategy.validate=true: the fingerprint exchange "
            "synchronises with the host and cannot be captured"
        ]
    backend = resolve_backend(p)
    if backend in cls.graph_safe_backends:
        return []
    safe = [s for s in available_strategies() if backend in get_strategy(s).graph_safe_backends]
    return [
        f"parallel.cuda_graphs=true: strategy {strategy!r} cannot be captured in a CUDA graph "
        f"on {backend} (a progress thread, host synchronisation or host-side transport); "
        f"graph-safe strategies on {backend}: {safe or 'none'}"
    ]


def validate_run(spec: RunSpec) -> ModelConfig:
    """Raise ConfigError listing every problem; return the model config when all is well."""
    w, p = spec.workload, spec.parallel
    problems = parallel_problems(p)
    for name, options in run_strategies(spec):
        problems += strategy_problems(name, options) + graph_problems(name, options, p)
    for name in ("batch_size", "prompt_len", "new_tokens", "micro_batches", "repeats"):
        if getattr(w, name) <= 0:
            problems.append(f"workload.{name} must be > 0, got {getattr(w, name)}")
    if w.micro_batches > w.batch_size > 0:
        problems.append(
            f"workload.micro_batches={w.micro_batches} is larger than "
            f"workload.batch_size={w.batch_size}"
        )
    if w.warmup_tokens < 0 or w.temperature < 0 or w.top_k < 0 or w.background_load < 0:
        problems.append(
            "workload.warmup_tokens, temperature, top_k and background_load must be >= 0"
        )
    if w.reference not in REFERENCES:
        problems.append(f"workload.reference must be one of {REFERENCES}, got {w.reference!r}")
    if spec.fault.kind not in KINDS:
        problems.append(f"fault.kind must be one of {KINDS}, got {spec.fault.kind!r}")
    if spec.model.dtype not in DTYPES:
        problems.append(f"model.dtype must be one of {sorted(DTYPES)}, got {spec.model.dtype!r}")
    if spec.model.max_seq_len is not None and spec.model.max_seq_len <= 0:
        problems.append(f"model.max_seq_len must be > 0, got {spec.model.max_seq_len}")
    if spec.model.num_layers is not None and spec.model.num_layers <= 0:
        problems.append(f"model.num_layers must be > 0, got {spec.model.num_layers}")
    if spec.model.checkpoint and not os.path.isdir(spec.model.checkpoint):
        problems.append(f"model.checkpoint: {spec.model.checkpoint} is not a directory")
    if w.eval_text is not None and w.reference != "exact":
        problems.append(
            "workload.eval_text is scored against exact communication: set workload.reference=exact"
        )
    if w.eval_tokens < 1 or w.eval_chunk < 1:
        problems.append("workload.eval_tokens and workload.eval_chunk must be >= 1")
    if spec.compare and p.cuda_graphs:
        problems.append(
            "compare with parallel.cuda_graphs=true: a captured graph holds one strategy's "
            "collectives; measure each strategy in its own job"
        )
    if w.text is not None and w.prompts:
        problems.append("workload.text and workload.prompts are two prompt sources: pick one")
    if problems:
        raise ConfigError("invalid run configuration:\n  - " + "\n  - ".join(problems))
    try:
        cfg = model_config(spec.model)
        if p.world_size > 0:
            cfg.validate_tp(p.world_size)
        prompts = load_prompts(spec, cfg.vocab_size)
        if w.eval_text is not None:
            _check_eval_text(spec, cfg.max_seq_len)
    except (ValueError, OSError, ImportError, RuntimeError) as e:  # RuntimeError: pip failed
        raise ConfigError(f"invalid run configuration: {e}") from e
    longest = max(len(q) for q in prompts)
    for name in ("new_tokens", "warmup_tokens"):  # the warm-up decodes as far as it asks
        if longest + getattr(w, name) > cfg.max_seq_len:
            raise ConfigError(
                f"invalid run configuration: prompt length {longest} + workload.{name} "
                f"{getattr(w, name)} exceeds the model context {cfg.max_seq_len}"
            )
    if w.micro_batches > len(prompts):
        raise ConfigError(
            f"invalid run configuration: micro_batches={w.micro_batches} is "
            f"larger than the {len(prompts)} prompts"
        )
    return cfg
