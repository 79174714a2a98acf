"""Check a GPU host in one command: ``python -m experiments.gpu_check [--dry-run]``.

Runs, on one GPU, in 6 minutes at most: each step runs in a process group of its own, killed
when its time budget is spent (the budgets add up to 360 s), and a failed or timed-out step is
recorded while the others still run:

1. the conformance kit with CUDA tensors over gloo on 2 and 4 processes sharing GPU 0, for
   every strategy that takes CUDA tensors on gloo (real multi-rank collectives);
2. the conformance kit on NCCL at world size 1 for every strategy that runs on NCCL (the
   schedules launch on a CUDA communication stream there), and ``shm``'s refusal;
3. the CUDA-stream launch on the device: a slow stand-in collective (a device sleep) must still
   be running when the launch returns, and the caller's next kernel must see its result;
4. TP inference (tiny preset) on CUDA: TP 1 over NCCL, TP 1 with the decode step in a CUDA
   graph, TP 1 with ``async_overlap`` and 2 micro-batches (the stream path end to end) and TP 2
   over gloo with both ranks on GPU 0; every run's tokens must equal the CPU run's;
5. the decode step of ``llama3-8b`` cut to 2 layers (bf16, batch 1) against the cost model's
   weight-streaming prediction (the weights a step reads / HBM bandwidth), with the error;
6. ``naive`` against a bare library all-reduce (nccl-tests' method, ``framework.run.measure``)
   over gloo with CUDA tensors on 2 processes, 4 KiB to 64 MiB.

One GPU cannot check NCCL beyond world size 1 (where a sum is its input): the NCCL collectives
of tree and hierarchical, and a captured NCCL kernel, need a host with 2 or more GPUs.

It writes ``results/gpu/<device name>.md`` with the machine description and every number, and
exits 1 if a step failed (the others still run). On a host without a GPU, or with ``--dry-run``,
it prints the plan and exits 0. It needs torch with CUDA and Lightning, not Hydra or W&B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "gpu"
# HBM bandwidth by device name (GB/s, vendor datasheets), for the decode prediction
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


@dataclass
class Step:
    name: str
    plan: str
    budget_s: int
    run: Callable[[dict[str, Any]], list[str]]  # -> report lines; raises on failure


# -- 1 and 2: the conformance kit ------------------------------------------------------------
def _gloo_cuda_strategies() -> list[str]:
    from framework.comm.registry import available_strategies, get_strategy

    return [s for s in available_strategies() if "cuda" in get_strategy(s).supports.get("gloo", ())]


def _nccl_strategies() -> list[str]:
    from framework.comm.registry import available_strategies, get_strategy

    return [s for s in available_strategies() if "nccl" in get_strategy(s).supports]


def _kit_all(names: list[str]) -> dict[str, int]:
    from framework.testing.kit import run_checks

    return {name: len(run_checks(name, {}, None, "cuda")) for name in names}


def _shm_refusal() -> str:
    from framework.comm.communicator import CommError
    from framework.comm.registry import build_communicator

    try:
        build_communicator("shm").close()
    except CommError as e:
        return str(e)
    raise AssertionError("shm was built on an NCCL group")


def kit_gloo_cuda(ctx: dict[str, Any]) -> list[str]:
    from framework.testing.rankpool import RankPool

    names = _gloo_cuda_strategies()
    lines = []
    for ws in (2, 4):
        pool = RankPool(ws, pg_timeout_s=60)
        try:
            t0 = time.perf_counter()
            passed = pool.run(_kit_all, names, timeout_s=100)[0]
        finally:
            pool.close()
        lines.append(
            f"- gloo, CUDA tensors, {ws} processes on one GPU: "
            + ", ".join(f"{n} ({k} checks)" for n, k in passed.items())
            + f" passed in {time.perf_counter() - t0:.0f} s"
        )
    return lines


def kit_nccl(ctx: dict[str, Any]) -> list[str]:
    from framework.testing.rankpool import RankPool

    names = _nccl_strategies()
    pool = RankPool(1, pg_timeout_s=60, backend="nccl")
    try:
        passed = pool.run(_kit_all, names, timeout_s=60)[0]
        refusal = pool.run(_shm_refusal, timeout_s=30)[0]
    finally:
        pool.close()
    return [
        "- NCCL, world size 1: "
        + ", ".join(f"{n} ({k} checks)" for n, k in passed.items())
        + " passed",
        f"- shm on NCCL refused as documented: `{refusal}`",
    ]


# -- the CUDA-stream launch, on the device ------------------------------------------------------
def stream_protocol(ctx: dict[str, Any]) -> list[str]:
    """A slow collective stand-in (a device sleep, then the add) on the communication stream:
    the launch returns before it ran, and the caller's next kernel still sees its result."""
    from collections import deque

    from framework.comm.streams import StreamLauncher

    x = torch.ones(1 << 20, device="cuda")
    launcher = StreamLauncher()

    def slow() -> None:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
        x.add_(1)

    t0 = time.perf_counter()
    fut = launcher.launch(x, slow, deque())
    launch_s = time.perf_counter() - t0
    pending = not fut.done()
    y = fut.result() * 2  # queued on the caller's stream behind the event
    torch.cuda.synchronize()
    ok = bool((y == 4).all())
    lines = [
        f"- launch returned after {launch_s * 1e3:.2f} ms with the collective "
        f"{'still running' if pending else 'ALREADY DONE'} on the device; the caller's next "
        f"kernel saw {'the result' if ok else 'STALE DATA'}"
    ]
    if not (pending and ok):
        raise AssertionError("\n".join(lines))
    return lines


# -- 3 and 4: TP inference --------------------------------------------------------------------
def _run(strategy: str = "naive", **kw: Any) -> dict[str, Any]:
    from framework.run.runner import launch
    from framework.run.spec import ModelSpec, ParallelSpec, RunSpec, WorkloadSpec

    model = kw.pop("model", ModelSpec(preset="tiny"))
    workload = kw.pop("workload", WorkloadSpec(batch_size=4, prompt_len=16, new_tokens=16))
    with tempfile.TemporaryDirectory() as out:
        spec = RunSpec(
            strategy=strategy,
            model=model,
            workload=workload,
            parallel=ParallelSpec(timeout_s=120, **kw),
            out_dir=out,
        )
        return launch(spec, progress=False)


def tp_cuda(ctx: dict[str, Any]) -> list[str]:
    from framework.run.spec import WorkloadSpec

    cpu = _run(world_size=1, backend="gloo", device="cpu")
    runs = {
        "TP 1, NCCL, naive": _run(world_size=1, backend="nccl"),
        "TP 1, NCCL, naive, CUDA graph": _run(world_size=1, backend="nccl", cuda_graphs=True),
        "TP 1, NCCL, async_overlap, 2 micro-batches": _run(
            "async_overlap",
            world_size=1,
            backend="nccl",
            workload=WorkloadSpec(batch_size=4, prompt_len=16, new_tokens=16, micro_batches=2),
        ),
        "TP 2, gloo, CUDA tensors on one GPU, naive": _run(
            world_size=2, backend="gloo", device="cuda"
        ),
    }
    lines, bad = [], []
    for what, r in runs.items():
        same = r["tokens"] == cpu["tokens"]
        extra = f", graph capture {r['graph_capture_s'] * 1e3:.0f} ms" if r["cuda_graphs"] else ""
        lines.append(
            f"- {what}: tokens {'equal' if same else 'DIFFER from'} the CPU run's; decode "
            f"{r['decode_tokens_per_s']:.0f} tok/s, ITL p50 {r['itl_p50_s'] * 1e3:.2f} ms, "
            f"{r['collectives_per_token']:.0f} collectives per step{extra}"
        )
        if not same:
            bad.append(what)
    if bad:
        raise AssertionError(f"tokens differ from the CPU run: {bad}\n" + "\n".join(lines))
    return lines


def decode_8b(ctx: dict[str, Any]) -> list[str]:
    import dataclasses

    from framework.costmodel import DecodeShape, decode_step, load_topology
    from framework.model import full_param_shapes, get_config
    from framework.run.spec import ModelSpec, WorkloadSpec

    r = _run(
        world_size=1,
        backend="nccl",
        model=ModelSpec(preset="llama3-8b", num_layers=2, dtype="bfloat16", max_seq_len=256),
        workload=WorkloadSpec(batch_size=1, prompt_len=16, new_tokens=64, warmup_tokens=8),
    )
    cfg = dataclasses.replace(get_config("llama3-8b"), num_layers=2)
    # a decode step reads every weight once, except the embedding table (B rows of it)
    params = sum(
        torch.Size(shape).numel()
        for name, shape in full_param_shapes(cfg).items()
        if name != "model.embed_tokens.weight"
    )
    hbm = ctx["hbm_gbps"]
    topo = dataclasses.replace(load_topology("h100_nvlink"), hbm_gbps=hbm)
    shape = DecodeShape(cfg.hidden_size, cfg.num_layers, params, batch=1)
    pred = decode_step(topo, "naive", 1, shape)["itl_s"]
    meas = r["itl_p50_s"]
    ctx["decode_8b"] = {"measured_s": meas, "predicted_s": pred, "params": params}
    return [
        f"- llama3-8b, 2 layers ({params / 1e9:.2f} B parameters read per step, bf16; the "
        f"embedding table is not), batch 1, TP 1: "
        f"ITL p50 {meas * 1e3:.3f} ms measured, {pred * 1e3:.3f} ms predicted "
        f"(weights / {hbm:.0f} GB/s HBM): error {abs(pred - meas) / meas:.0%} "
        f"({'the model is optimistic' if pred < meas else 'the model is pessimistic'}: "
        f"launch overheads and the attention over the cache are not in it)"
    ]


# -- 5: bench ---------------------------------------------------------------------------------
def _bench(sizes: list[int]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from framework.comm.registry import build_communicator
    from framework.run.measure import RawAllReduce, SweepSpec, sweep

    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    naive, raw = build_communicator("naive", timeout_s=60), RawAllReduce(60)
    try:
        spec = SweepSpec(sizes=tuple(sizes), warmup=5, iters=20, rounds=2)
        return sweep([naive, raw], spec, dist.get_rank(), dist.get_world_size(), device)["rows"]
    finally:
        naive.close()


def bench(ctx: dict[str, Any]) -> list[str]:
    from framework.run.measure import bench_sizes
    from framework.testing.rankpool import RankPool

    sizes = bench_sizes(4 << 10, 64 << 20, 4, 4)
    pool = RankPool(2, pg_timeout_s=60)
    try:
        rows = pool.run(_bench, sizes, timeout_s=100)[0]
    finally:
        pool.close()
    ctx["bench"] = rows
    lines = [
        "gloo, CUDA tensors, 2 processes on one GPU; medians of 40 iterations (max over ranks), "
        "naive and the bare call interleaved:",
        "",
        "| size (B) | naive (us) | bare all_reduce (us) | naive / bare | #wrong |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["time_us"] / r["baseline_time_us"]
        lines.append(
            f"| {r['size']} | {r['time_us']:.1f} | {r['baseline_time_us']:.1f} | "
            f"{ratio:.2f} | {r['wrong']} |"
        )
    ratios = [r["time_us"] / r["baseline_time_us"] for r in rows]
    lines += ["", f"Median naive / bare over sizes: {statistics.median(ratios):.2f}"]
    if any(r["wrong"] for r in rows):
        raise AssertionError("wrong elements in the bench\n" + "\n".join(lines))
    return lines


STEPS = [
    Step(
        "kit_gloo_cuda",
        "conformance kit, gloo + CUDA tensors, 2 and 4 processes on GPU 0",
        100,
        kit_gloo_cuda,
    ),
    Step("kit_nccl", "conformance kit on NCCL at world size 1; shm refuses NCCL", 40, kit_nccl),
    Step(
        "stream_protocol",
        "the CUDA-stream launch: returns at once, the consumer waits on the device",
        10,
        stream_protocol,
    ),
    Step(
        "tp_cuda",
        "TP inference on CUDA (TP 1 NCCL, CUDA graph, async_overlap; TP 2 gloo) = CPU tokens",
        110,
        tp_cuda,
    ),
    Step(
        "decode_8b",
        "llama3-8b with 2 layers: decode ITL against the weight-streaming prediction",
        50,
        decode_8b,
    ),
    Step(
        "bench", "naive against a bare all-reduce, 4 KiB - 64 MiB, gloo + CUDA tensors", 50, bench
    ),
]


# -- the machine and the report -------------------------------------------------------------
def machine() -> dict[str, str]:
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": props.name,
        "gpu_memory_gib": f"{props.total_memory / 2**30:.0f}",
        "gpus": str(torch.cuda.device_count()),
        "cuda": str(torch.version.cuda),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "python": platform.python_version(),
        "cpus": str(len(__import__("os").sched_getaffinity(0))),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = "unknown"
    return info


def hbm_for(name: str) -> float:
    for key, gbps in HBM_GBPS.items():
        if key in name:
            return gbps
    raise SystemExit(f"no HBM bandwidth known for {name!r}: pass --hbm-gbps")


def print_plan() -> None:
    print("gpu_check plan (python -m experiments.gpu_check):")
    for i, s in enumerate(STEPS, 1):
        print(f"  {i}. {s.name}: {s.plan} (budget {s.budget_s} s)")
    print(f"  writes {OUT.relative_to(ROOT)}/<device name>.md")


def run_step(step: Step, ctx: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    """Run ``step`` in a process group of its own, killed when its budget is spent (a hang in
    a collective or a capture must not eat the other steps' time). Returns (status, report
    lines, what the step adds to the context)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "step.json"
        cmd = [sys.executable, "-m", "experiments.gpu_check", "--step", step.name]
        cmd += ["--ctx", json.dumps(ctx), "--result", str(result)]
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=step.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"TIMED OUT after its {step.budget_s} s budget", [], {}
        if not result.exists():
            return f"FAILED (exit code {proc.returncode}, no result)", [], {}
        got = json.loads(result.read_text())
        return got["status"], got["lines"], got["ctx"]


def _child(name: str, ctx: dict[str, Any], result: str) -> int:
    step = next(s for s in STEPS if s.name == name)
    before = dict(ctx)
    try:
        lines, status = step.run(ctx), "passed"
    except Exception as e:  # recorded in the report; the other steps still run
        lines, status = [f"```\n{type(e).__name__}: {e}\n```"], "FAILED"
    found = {k: v for k, v in ctx.items() if k not in before}
    Path(result).write_text(json.dumps({"status": status, "lines": lines, "ctx": found}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step (run_step)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--only", help="comma-separated step names")
    ap.add_argument("--hbm-gbps", type=float, help="HBM bandwidth for the decode prediction")
    ap.add_argument("--out-dir", default=str(OUT))
    args = ap.parse_args(argv)
    if args.step:
        return _child(args.step, json.loads(args.ctx), args.result)
    print_plan()
    if args.dry_run:
        print("dry run: nothing measured")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device on this host: nothing measured")
        return 0
    info = machine()
    ctx: dict[str, Any] = {"hbm_gbps": args.hbm_gbps or hbm_for(info["gpu"])}
    wanted = set(args.only.split(",")) if args.only else {s.name for s in STEPS}
    sections, failed = [], []
    t_all = time.perf_counter()
    for s in STEPS:
        if s.name not in wanted:
            continue
        t0 = time.perf_counter()
        print(f"== {s.name}: {s.plan}", flush=True)
        status, lines, found = run_step(s, ctx)
        ctx.update(found)
        if status != "passed":
            failed.append(s.name)
        took = time.perf_counter() - t0
        sections += [f"## {s.name}: {status} in {took:.0f} s", "", s.plan, "", *lines, ""]
        print("\n".join(lines), flush=True)
    total = time.perf_counter() - t_all
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', info['gpu'])}.md"
    head = [
        f"# GPU check: {info['gpu']}",
        "",
        f"`python -m experiments.gpu_check`, {time.strftime('%Y-%m-%d')}, {total:.0f} s in all; "
        f"{'every step passed' if not failed else 'FAILED: ' + ', '.join(failed)}.",
        "",
        "| " + " | ".join(info) + " |",
        "|" + "---|" * len(info),
        "| " + " | ".join(info.values()) + " |",
        "",
    ]
    path.write_text("\n".join(head + sections))
    (out / f"{path.stem}.json").write_text(json.dumps({"machine": info, **ctx}, indent=1))
    print(f"wrote {path} ({total:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
