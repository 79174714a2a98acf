"""Lightning-style runner for tensor-parallel inference with a swappable communicator.

``launch(spec)`` validates the configuration, then starts ``world_size`` ranks with Lightning
Fabric (CPU -> gloo, CUDA -> NCCL). It spawns them in-process, so a Hydra multirun job starts
its own ranks and never re-runs the sweep; under torchrun or SLURM the launcher's processes are
used as they are. On each rank a :class:`Runner` goes through setup (communicator, model shard),
warm-up, timed prefill and decode, and teardown, calling the Fabric callbacks ``on_run_start``,
``on_prefill_end``, ``on_decode_step_end`` and ``on_run_end`` and logging step metrics to the
Fabric loggers. Times are the maximum over ranks (the slowest rank sets the pace of TP).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist

from framework.comm.profiling import profiled
from framework.comm.registry import build_communicator
from framework.comm.stats import OP_COUNTERS, OPS
from framework.model.generate import generate
from framework.run.faults import FaultInjector
from framework.run.launch import launch_ranks
from framework.run.measure import background_load
from framework.run.results import combine, compared, flat_summary, summarize
from framework.run.spec import (
    DTYPES,
    RunSpec,
    checkpoint_dir,
    eval_ids,
    load_prompts,
    model_config,
    resolve_backend,
    resolve_device,
    run_strategies,
    validate_run,
)


class Callback:
    """Base class for runner callbacks (all hooks optional; called on every rank)."""

    def on_run_start(self, runner: Runner) -> None: ...

    def on_prefill_end(self, runner: Runner) -> None: ...

    def on_decode_step_end(self, runner: Runner, step: int) -> None: ...

    def on_run_end(self, runner: Runner, results: dict[str, Any]) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar on rank 0 while tokens are generated."""

    def on_prefill_end(self, runner: Runner) -> None:
        if runner.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=runner.spec.workload.new_tokens,
                desc=runner.spec.strategy,
                unit="tok",
                leave=False,
            )
            self.bar.update(1)

    def on_decode_step_end(self, runner: Runner, step: int) -> None:
        if runner.rank == 0:
            self.bar.update(1)

    def on_run_end(self, runner: Runner, results: dict[str, Any]) -> None:
        if runner.rank == 0 and hasattr(self, "bar"):
            self.bar.close()


class Runner:
    """Drives one TP inference run on one rank, the way Lightning's loops drive training."""

    def __init__(self, fabric: Any, spec: RunSpec) -> None:
        self.fabric = fabric
        self.spec = spec
        self.rank = fabric.global_rank
        self.world_size = fabric.world_size
        self.comm = None
        self.model = None
        self.device = _rank_device(fabric, spec)
        self.graph = None  # the decode step's CUDA graph (parallel.cuda_graphs)
        self._exact = None  # the exact reference runs (numerics), made once per job

    # -- stages ---------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        torch.set_num_threads(spec.parallel.threads_per_rank)
        # the job's own strategy first, then what it is compared with (RunSpec.compare)
        self.runs = []  # (spec, communicator), appended as each is built: teardown closes them
        for name, opts in run_strategies(spec):
            one = dataclasses.replace(spec, strategy=name, strategy_options=opts, compare=None)
            self.runs.append((one, self._communicator(one)))
        self.spec, self.comm = self.runs[0]
        dtype, device = DTYPES[spec.model.dtype], self.device
        checkpoint = checkpoint_dir(spec.model)
        if checkpoint:
            from framework.model.checkpoint import load_hf_checkpoint

            self.model = load_hf_checkpoint(
                checkpoint,
                self.comm,
                self.rank,
                self.world_size,
                dtype,
                device,
                num_layers=spec.model.num_layers,
            )
        else:
            from framework.model import TPLlama

            self.model = TPLlama(
                model_config(spec.model), self.comm, self.rank, self.world_size, dtype, device
            ).init_random(spec.seed)
        self.prompts = load_prompts(spec, self.model.cfg.vocab_size)
        self.model.set_sequence_parallel(
            spec.parallel.sequence_parallel, spec.parallel.sp_min_tokens
        )
        if spec.parallel.cuda_graphs:
            from framework.run.graphs import GraphDecode

            self.graph = GraphDecode(self.model, self.comm, spec.workload.micro_batches)

    def _communicator(self, spec: RunSpec) -> Any:
        opts = dict(spec.strategy_options)
        opts.setdefault("timeout_s", spec.parallel.timeout_s)
        comm = build_communicator(spec.strategy, **opts)
        if spec.parallel.cuda_graphs and not comm.graph_safe:
            comm.close()
            raise RuntimeError(
                f"parallel.cuda_graphs=true: the communicator {spec.strategy!r} on "
                f"{comm.backend} is not graph-safe (Communicator.graph_safe); run without "
                f"CUDA graphs or with a graph-safe strategy"
            )
        return comm

    def _use(self, spec: RunSpec, comm: Any) -> None:
        """Measure ``spec``'s strategy from now on: the same ranks, weights and prompts."""
        self.spec, self.comm = spec, comm
        self.model.set_communicator(comm)

    def _generate(self, new_tokens: int, **hooks: Any):
        """Warm-up and measured run alike; with a CUDA graph both use the measured run's cache
        shape, so the graph captured in the warm-up's first decode step (``warmup_tokens``
        >= 2; else in the measured run's) is replayed, not recaptured, in the measured run."""
        w = self.spec.workload
        if self.graph is not None:
            hooks["decode_step"] = self.graph
            hooks["cache_len"] = max(len(p) for p in self.prompts) + w.new_tokens
        return generate(
            self.model,
            self.prompts,
            new_tokens,
            micro_batches=w.micro_batches,
            temperature=w.temperature,
            top_k=w.top_k,
            seed=self.spec.seed,
            **hooks,
        )

    def warmup(self) -> None:
        if self.spec.workload.warmup_tokens:
            self._generate(self.spec.workload.warmup_tokens)
        self.comm.flush()
        self.comm.end_warmup()

    def measure(self) -> dict[str, Any]:
        """Timed prefill + decode on this rank; returns this rank's raw measurements."""
        self.comm.reset_stats()
        if self.device.type == "cuda":  # this measurement's peak, not the job's so far
            torch.cuda.reset_peak_memory_stats(self.device)
        stamps: list[float] = []
        snap: dict[str, float] = {}

        pending: list[int] = []
        rss: list[int] = []

        def prefill_end() -> None:
            self._sync_device()
            stamps.append(time.perf_counter())
            snap.update(self.comm.stats.as_dict())
            rss.append(_rss_bytes())
            self.fabric.call("on_prefill_end", runner=self)

        def step_end(step: int) -> None:
            self._sync_device()
            stamps.append(time.perf_counter())
            pending.append(self.comm.pending)
            self.fabric.log_dict({"itl_s": stamps[-1] - stamps[-2]}, step=step)
            self.fabric.call("on_decode_step_end", runner=self, step=step)

        self.model.sp_steps = self.model.sp_padded_tokens = 0
        dist.barrier()
        with profiled(self.spec.profile, self.spec.out_dir, self.rank, self.device.type == "cuda"):
            t0 = time.perf_counter()
            out = self._generate(
                self.spec.workload.new_tokens, on_prefill_end=prefill_end, on_step_end=step_end
            )
            self.comm.flush()
        end = self.comm.stats.as_dict()
        decode = {
            k: end[k] - snap.get(k, 0)
            for k in ("calls", "collectives", "bytes", "wire_bytes", "wait_s")
        }
        per_op = {
            phase: {
                op: {c: end[f"{op}_{c}"] - base.get(f"{op}_{c}", 0) for c in OP_COUNTERS}
                for op in OPS
            }
            for phase, base, end in (("prefill", {}, snap), ("decode", snap, end))
        }
        return {
            "ttft_s": stamps[0] - t0,
            "itl_s": [b - a for a, b in pairwise(stamps)],
            "decode_s": stamps[-1] - stamps[0],
            "decode": decode,
            "prefill_wait_s": snap.get("wait_s", 0.0),
            "buffer_allocs": end["buffer_allocs"],
            "buffer_reuses": end["buffer_reuses"],
            "peak_mem_bytes": self._peak_memory(),
            # resident memory from the end of prefill to the end of decode: a leak shows here
            "rss_growth": (_rss_bytes() - rss[0]) / rss[0] if rss[0] else 0.0,
            "pending_max": max(pending, default=0),
            "per_op": per_op,
            "sp_steps": self.model.sp_steps,
            "sp_padded_tokens": self.model.sp_padded_tokens,
            "extra": {
                k: v
                for k, v in end.items()
                if k not in decode
                and k not in ("buffer_allocs", "buffer_reuses")
                and not k.startswith(tuple(f"{op}_" for op in OPS))
            },
            "tokens": out.tokens,
            "exact": self.comm.exact,  # the built communicator's (auto, schedules: per options)
            "prompt_tokens": sum(len(p) for p in self.prompts),
            "prompt_len": max(len(p) for p in self.prompts),
            "graph_capture_s": self.graph.capture_s if self.graph is not None else 0.0,
        }

    def numerics(self, tokens: list[list[int]]) -> dict[str, Any]:
        """The ``numerics`` block (:mod:`framework.run.numerics`): the same prompts decoded
        with exact communication on these ranks and weights, then with the strategy under
        test teacher-forced on the exact tokens. Runs after the measured run: it costs two
        more generations but changes no timing. Both decode as the measured run did (its
        temperature, top-k and seed), so an exact strategy agrees with itself when sampling.
        With ``workload.eval_text`` the block gains ``perplexity``
        (:mod:`framework.run.perplexity`). The exact runs are made once per job (every
        compared strategy is held to the same ones)."""
        from framework.run.numerics import compare

        w = self.spec.workload
        kw = {
            "micro_batches": w.micro_batches,
            "temperature": w.temperature,
            "top_k": w.top_k,
            "seed": self.spec.seed,
            "return_logits": True,
        }
        if self._exact is None:
            self._exact = self._exact_runs(kw)
        ref, exact_wire, exact_eval = self._exact
        self.comm.reset_stats()
        forced = generate(self.model, self.prompts, w.new_tokens, teacher=ref.tokens, **kw)
        self.comm.flush()
        block = compare(
            forced.logits,
            ref.logits,
            forced.tokens,
            ref.tokens,
            tokens,
            self.comm.stats.wire_bytes,
            exact_wire,
        )
        if exact_eval is not None:
            from framework.run.perplexity import perplexity_block, score

            ids, digest = self._eval
            mine = score(self.model, ids, w.eval_chunk, exact_eval["logp"] or None, keep=False)
            if self.rank == 0:
                block["perplexity"] = perplexity_block(w.eval_text, digest, mine, exact_eval)
        return block

    def _exact_runs(self, kw: dict[str, Any]) -> tuple[Any, int, dict[str, Any] | None]:
        """Exact communication (``naive``) on these ranks and weights: the prompts decoded,
        the bytes it sent, and (with an evaluation text) the text scored."""
        exact = build_communicator("naive", timeout_s=self.spec.parallel.timeout_s)
        w = self.spec.workload
        try:
            self.model.set_communicator(exact)
            ref = generate(self.model, self.prompts, w.new_tokens, **kw)
            exact.flush()
            wire = exact.stats.wire_bytes  # the prompts' decode only, like the strategy's
            scored = None
            if w.eval_text is not None:
                from framework.run.perplexity import score

                self._eval = eval_ids(self.spec)
                scored = score(self.model, self._eval[0], w.eval_chunk, None, self.rank == 0)
            return ref, wire, scored
        finally:
            self.model.set_communicator(self.comm)
            exact.close()

    def rounds(self) -> list[list[dict[str, Any]]]:
        """Warm every strategy up, then measure each once per round (``workload.repeats``
        rounds), the order rotated each round, so that every strategy sees the host in the
        same states and none always runs first; then the numerics blocks. Per strategy, this
        rank's measurements."""
        for spec, comm in self.runs:
            self._use(spec, comm)
            self.warmup()
        n, repeats = len(self.runs), self.spec.workload.repeats
        mine: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for r in range(repeats):
            for j in [(r + k) % n for k in range(n)]:
                self._use(*self.runs[j])
                mine[j].append(self.measure())
        for j, (spec, comm) in enumerate(self.runs):
            if spec.workload.reference == "exact":
                self._use(spec, comm)
                mine[j][0]["numerics"] = self.numerics(mine[j][0]["tokens"])
        self._use(*self.runs[0])
        return mine

    def teardown(self) -> None:
        errors = []
        for _, comm in getattr(self, "runs", []):
            try:
                comm.close()
            except Exception as e:  # close the others; the run's own error, if any, wins
                errors.append(e)
        if errors and sys.exc_info()[0] is None:
            raise errors[0]

    def run(self) -> dict[str, Any]:
        try:
            self.setup()  # inside: a failed load still releases the communicator's groups
            self.fabric.call("on_run_start", runner=self)
            mine = self.rounds()
            per_rank: list[list[list[dict[str, Any]]]] = [None] * self.world_size  # type: ignore[list-item]
            dist.all_gather_object(per_rank, mine)
            each = [
                combine([summarize(spec, [r[j][i] for r in per_rank]) for i in range(len(mine[j]))])
                for j, (spec, _) in enumerate(self.runs)
            ]
            results = each[0] if len(each) == 1 else compared(each)
            self.fabric.call("on_run_end", runner=self, results=results)
            flat = flat_summary(results)
            self.fabric.log_dict({k: v for k, v in flat.items() if _number(v)})
            for lg in self.fabric.loggers:
                lg.finalize("success")
            return results
        finally:
            self.teardown()

    # -- helpers --------------------------------------------------------------------------
    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rank_device(fabric: Any, spec: RunSpec) -> torch.device:
    """Fabric's device, except for CUDA tensors on gloo (Fabric launches those ranks as CPU
    processes): rank i takes GPU i mod count, so several ranks may share one GPU."""
    if resolve_device(spec.parallel) == "cuda" and resolve_backend(spec.parallel) == "gloo":
        device = torch.device("cuda", fabric.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return fabric.device


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _rank_main(fabric: Any, spec: RunSpec) -> dict[str, Any]:
    return Runner(fabric, spec).run()


def launch(
    spec: RunSpec,
    callbacks: list[Callback] | None = None,
    loggers: list[Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Validate ``spec`` and run it on ``spec.parallel.world_size`` ranks; rank 0's results."""
    validate_run(spec)
    cbs = list(callbacks or []) + ([ProgressBar()] if progress else [])
    if spec.fault.kind != "none":
        cbs.append(FaultInjector(spec.fault))
    with background_load(spec.workload.background_load):
        return launch_ranks(_rank_main, spec.parallel, spec, callbacks=cbs, loggers=loggers)
