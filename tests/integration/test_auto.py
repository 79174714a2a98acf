"""auto: dispatch by a measured table or an online tuner, exact, the same choice on every rank,
fixed after warm-up, choices counted; bench.tune writes the table auto reads."""

from __future__ import annotations

from pathlib import Path

from conftest import as_torchrun_rank, compose_config, run_on_rank, write_table

import experiments.configs  # noqa: F401
from experiments.common import run_spec
from framework import build_communicator
from framework.testing import run_checks


def _dispatch(table: str | None) -> dict:
    """Calls of 512 B and 4 KiB: exact sums, and which candidate served them."""
    import torch
    import torch.distributed as dist

    from framework.run.inputs import expected_sum, rank_input

    r, p = dist.get_rank(), dist.get_world_size()
    opts = {"table": table} if table else {"candidates": ["tree", "shm", "naive"]}
    comm = build_communicator("auto", **opts)
    try:
        for numel in (128, 1024, 128):
            got = comm.all_reduce(rank_input(numel, r, numel, torch.float32)).wait()
            assert torch.equal(got, expected_sum(numel, p, numel, torch.float32))
        comm.end_warmup()
        comm.all_reduce(rank_input(9, r, 1 << 16, torch.float32)).wait()  # unseen bucket
        return {"extra": dict(comm.stats.extra), "choice": dict(comm.choice)}
    finally:
        comm.close()


def test_table_dispatch_counts_choices(pools, tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.json")
    for out in pools(2).run(_dispatch, table):
        extra = out["extra"]
        # 512 B twice -> tree; 4 KiB and the 256 KiB call (nearest bucket: 4 KiB) -> shm
        assert extra["auto_tree_calls"] == 2 and extra["auto_shm_calls"] == 2
        assert extra["auto_untuned_calls"] == 1


def test_table_for_another_world_size_is_refused(pools, tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.json", world_size=4)
    kit = pools(2).run(_dispatch_error, table)
    assert all("no rows for world size 2" in msg for msg in kit)


def _dispatch_error(table: str) -> str:
    try:
        build_communicator("auto", table=table)
    except ValueError as e:
        return str(e)
    return "built"


def test_online_tuner_same_choice_everywhere_and_frozen(pools) -> None:
    outs = pools(3).run(_dispatch, None)
    assert all(o["choice"] == outs[0]["choice"] for o in outs)  # every rank chose alike
    assert len(outs[0]["choice"]) == 2  # two buckets tuned before end_warmup, none after
    assert outs[0]["extra"]["auto_untuned_calls"] == 1


def test_kit_with_awrite_table(pools, tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.json", world_size=3)
    pools(3).run(run_checks, "auto", {"table": table}, ["exact_sums", "scatter_gather_exact"])


def _bench_tune(cfg) -> dict:
    from omegaconf import OmegaConf

    from experiments.bench import _rank_bench
    from experiments.configs import BenchSpec
    from framework.run.launch import launch_ranks
    from framework.run.spec import ParallelSpec

    bench = BenchSpec(**OmegaConf.to_container(cfg.bench, resolve=True))
    parallel = ParallelSpec(**OmegaConf.to_container(cfg.parallel, resolve=True))
    with as_torchrun_rank():
        return launch_ranks(_rank_bench, parallel, "naive", {}, bench, parallel)


def test_bench_times_every_candidate_interleaved(pools) -> None:
    cfg = compose_config(
        "bench.tune=unused",
        "bench.min_bytes=1024",
        "bench.max_bytes=4096",
        "bench.iters=2",
        "bench.warmup=1",
        "parallel.world_size=2",
        name="bench",
    )
    out = pools(2).run(_bench_tune, cfg)[0]
    for row in out["rows"]:
        assert set(row["times_us"]) >= {"naive", "tree", "shm", "oneshot", "twoshot"}
        assert "quantized" not in row["times_us"] and "speedup" not in row


def test_infer_with_auto_fixes_choices_in_warmup(pools, tmp_path: Path) -> None:
    cfg = compose_config("strategy=auto", "workload.new_tokens=4")
    res = pools(2).run(run_on_rank, run_spec(cfg, str(tmp_path)))[0]
    assert res["status"] == "ok", res
    served = {k: v for k, v in res["comm_extra"].items() if k.endswith("_calls")}
    assert "auto_untuned_calls" not in served  # warm-up saw every message shape
    # the model's reductions are fused all-reduces (all_reduce_add_rmsnorm), each served
    # by one candidate's all-reduce
    ops = ("all_reduce", "all_reduce_add_rmsnorm")
    phases = res["per_op"].values()
    assert sum(served.values()) == sum(ph[op]["calls"] for ph in phases for op in ops)


def _budgeted(acc_table: str | None, budget: dict, candidates: list[str]) -> dict:
    """auto under an error budget: what it kept, and sums of a few sizes."""
    import torch
    import torch.distributed as dist

    from framework.run.inputs import expected_sum, rank_input

    r, p = dist.get_rank(), dist.get_world_size()
    comm = build_communicator(
        "auto", candidates=candidates, error_budget=budget, accuracy=acc_table, tune_iters=1
    )
    try:
        exact = True
        for numel in (64, 4096):
            got = comm.all_reduce(rank_input(numel, r, numel, torch.float32)).wait()
            exact &= torch.equal(got, expected_sum(numel, p, numel, torch.float32))
        allowed = comm._allowed(("all_reduce", "float32", 16384), list(comm.algos))
        return {
            "kept": list(comm.algos),
            "dropped": dict(comm.dropped),
            "exact": bool(exact),
            "allowed": allowed,
        }
    finally:
        comm.close()


def test_error_budget_keeps_the_candidates_within_it(pools, tmp_path: Path) -> None:
    from framework.comm.accuracy import write_accuracy

    int8, int4 = "quantized:block=32,fmt=int8", "quantized:block=32,fmt=int4"
    rows = [
        {
            "strategy": int8,
            "world_size": 2,
            "ppl_change": 0.001,
            "ppl_change_hi": 0.003,
            "kl_per_token": 0.001,
        },
        {
            "strategy": int4,
            "world_size": 2,
            "ppl_change": 0.04,
            "ppl_change_hi": 0.06,
            "kl_per_token": 0.03,
        },
    ]
    table = str(write_accuracy(tmp_path / "acc.json", rows, {}))
    outs = pools(2).run(_budgeted, table, {"ppl_change": 0.01}, ["naive", int8, int4])
    assert all(o["kept"] == ["naive", int8] for o in outs)
    assert outs[0]["dropped"] == {int4: "ppl_change 0.06 > 0.01"}
    # rel_error from the strategy's own bound: int4 states ~1e-1, so 1e-6 leaves only naive
    outs = pools(2).run(_budgeted, None, {"rel_error": 1e-6}, ["naive", int4])
    assert all(o["exact"] and o["allowed"] == ["naive"] for o in outs)
    outs = pools(2).run(_budgeted, None, {"rel_error": 0.5}, ["naive", int4])
    assert outs[0]["allowed"] == ["naive", int4]


def _batch_invariant() -> dict:
    """The same rows summed alone and inside a message 64 times larger (another size
    bucket): bit for bit the same under deterministic=true."""
    import torch
    import torch.distributed as dist

    r = dist.get_rank()
    x = torch.randn(64, 192, generator=torch.Generator().manual_seed(r))
    comm = build_communicator("auto", deterministic=True, tune_iters=1)
    try:
        alone = comm.all_reduce(x[:1].clone()).wait()
        batch = comm.all_reduce(x.clone()).wait()
        return {
            "same": bool(torch.equal(alone[0], batch[0])),
            "order": comm.summation_order,
            "kept": list(comm.algos),
        }
    finally:
        comm.close()


def test_deterministic_auto_is_batch_invariant(pools) -> None:
    outs = pools(3).run(_batch_invariant)
    assert all(o["same"] for o in outs)
    assert outs[0]["order"] == "rank" and set(outs[0]["kept"]) == {"oneshot", "shm"}
