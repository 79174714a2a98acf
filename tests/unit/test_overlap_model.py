"""The overlap and fusion formulas (``framework.costmodel.overlap``) and the TP layer built on
them (``tp_layer``), on hand-computed cases (pure math)."""

from __future__ import annotations

import dataclasses

import pytest

from framework.costmodel import DecodeShape, decode_step, load_topology
from framework.costmodel.overlap import (
    chunked_time,
    composed_time,
    epilogue_saving,
    epilogue_time,
    matmul_time,
    token_split_time,
)
from framework.costmodel.tp_layer import LayerShape, layer_compute, schedules, tp_allreduce_time

ALPHA, BETA = 10e-6, 1e-9  # a collective: 10 us start-up, 1 GB/s


def comm(nbytes: float) -> float:
    return ALPHA + nbytes * BETA


def test_one_chunk_is_composed() -> None:
    assert chunked_time(3e-4, comm, 1e5, 1, start_s=5e-6, sm_share=0.2) == pytest.approx(
        composed_time(3e-4, comm(1e5))
    )


def test_communication_bound_pipeline_is_fill_plus_every_chunks_transfer() -> None:
    """comm >> compute: the compute hides behind all but the first chunk, so the op takes the
    first chunk's compute (fill) and c transfers of n/c, each with its own start-up."""
    t_m, n, c = 1e-5, 1e6, 4
    got = chunked_time(t_m, comm, n, c)
    assert got == pytest.approx(t_m / c + c * ALPHA + n * BETA)
    assert got - (t_m / c + comm(n)) == pytest.approx((c - 1) * ALPHA)  # extra start-ups


def test_compute_bound_pipeline_exposes_only_the_last_transfer() -> None:
    t_m, n, c = 1e-2, 1e6, 4
    assert chunked_time(t_m, comm, n, c) == pytest.approx(t_m + comm(n / c))
    # the collective's SMs slow the compute it overlaps: 3 of the 4 chunks run beside one
    slow = chunked_time(t_m, comm, n, c, sm_share=0.25)
    assert slow == pytest.approx(t_m / 4 + 3 * (t_m / 4) / 0.75 + comm(n / c))


def test_more_chunks_pay_more_start_up() -> None:
    """No compute to hide behind: each chunk past the first adds a collective start-up and
    a chunk start-up, and nothing else."""
    n, s = 1e6, 3e-6
    one = chunked_time(0.0, comm, n, 1, start_s=s)
    for c in (2, 4, 8):
        assert chunked_time(0.0, comm, n, c, start_s=s) - one == pytest.approx(
            (c - 1) * (ALPHA + s)
        )
    with pytest.raises(ValueError, match="at least 1"):
        chunked_time(1.0, comm, n, 0)


def test_token_split_never_beats_the_busier_resource() -> None:
    halves, half_comm = [3.0, 1.0, 2.0, 2.0], 2.0
    got = token_split_time(halves, half_comm)
    assert got == 3 + 2 + 2 + 2
    assert got >= max(sum(halves), len(halves) * half_comm)
    assert token_split_time(halves, half_comm, sm_share=0.5) == 6 + 2 + 4 + 4


def test_fused_epilogue_saves_exactly_the_stated_passes_and_two_kernels() -> None:
    """Composed: add (read 2, write 1), norm (read 1, write 1) = 5 passes, 2 kernels; fused
    into the all-reduce: read the residual, write residual and output, not the sum = 2."""
    nv = dataclasses.replace(load_topology("h100_nvlink"), hbm_gbps=1000.0, kernel_s=2e-6)
    n, one_pass = 1e6, 1e6 / 1e12
    assert epilogue_time(nv, n, fused=False) == pytest.approx(5 * one_pass + 4e-6)
    assert epilogue_time(nv, n, fused=True) == pytest.approx(2 * one_pass)
    assert epilogue_saving(nv, n) == pytest.approx(3 * one_pass + 4e-6)
    assert epilogue_saving(nv, n, norm_reads=2) == pytest.approx(4 * one_pass + 4e-6)


def test_matmul_roofline_weights_in_decode_flops_in_prefill() -> None:
    nv = load_topology("h100_nvlink")
    k, cols = 8192, 1024
    decode = matmul_time(nv, 1, k, cols)  # reads the weights once
    assert decode == pytest.approx((k + k * cols + cols) * 2 / 3350e9)
    prefill = matmul_time(nv, 8192, k, cols)
    assert prefill == pytest.approx(2 * 8192 * k * cols / (989e12 * 0.7))


LLAMA_8B = LayerShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128)


def test_composed_layer_is_the_decode_step_formula_per_layer() -> None:
    """The TP layer's composed time, times the layers, is decode_step's compute + 2L
    all-reduces with the same compute and all-reduce (one model, not two)."""
    nv = load_topology("h100_nvlink")
    batch, layers, n = 16, 32, 16 * 4096 * 2
    c = layer_compute(nv, LLAMA_8B, batch, 8, context=1024)
    per_layer = sum(c.values()) + len(c) * nv.kernel_s + 2 * epilogue_time(nv, n, False)
    step = decode_step(
        nv,
        "naive",
        8,
        DecodeShape(4096, layers, 8e9, batch),
        compute_s=layers * per_layer,
        allreduce_s=tp_allreduce_time(nv, 8, n),
    )["itl_s"]
    assert step == pytest.approx(
        layers * schedules(nv, LLAMA_8B, batch, 8, context=1024)["composed"]
    )


def test_schedules_differ_from_composed_only_where_they_say() -> None:
    """fused saves the epilogue passes and kernels of both all-reduces; chunked changes only
    the two row-parallel pairs; a batch of one has nothing to split."""
    nv = load_topology("h100_nvlink")
    t = schedules(nv, LLAMA_8B, 1024, 8)
    n = 1024 * 4096 * 2
    assert t["composed"] - t["fused"] == pytest.approx(2 * epilogue_saving(nv, n))
    c = layer_compute(nv, LLAMA_8B, 1024, 8)
    pairs = sum(c[m] + tp_allreduce_time(nv, 8, n) for m in ("o_proj", "down"))
    for k in (2, 4, 8):
        rest = t["composed"] - pairs
        assert t[f"chunked_{k}"] - rest == pytest.approx(
            sum(
                chunked_time(
                    c[m], lambda b: tp_allreduce_time(nv, 8, b), n, k, nv.kernel_s, nv.comm_sm_share
                )
                for m in ("o_proj", "down")
            )
        )
    assert schedules(nv, LLAMA_8B, 1, 8, context=1024)["token_split"] == float("inf")
