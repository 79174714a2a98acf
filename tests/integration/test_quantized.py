"""The quantized wire: the codec's stated bound holds and is tight, the strategy keeps it in
every op and format (through the conformance kit), the wire carries fewer bytes, and a
strategy that claims a tighter bound than it keeps fails the kit."""

from __future__ import annotations

import pytest
import torch
from conftest import first_only

from framework.comm import quant
from framework.testing import run_checks

BOUND_CHECKS = ["exact_sums", "float_order", "scatter_gather_exact", "scatter_gather_floats"]


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_within_its_bound_and_the_bound_is_tight(fmt: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n = 5003  # not a multiple of the block: a padded last block
    x = (torch.randn(n, generator=g) * torch.logspace(-5, 3, n)).to(dtype)
    payload = torch.empty(quant.payload_bytes(fmt, n, 64), dtype=torch.uint8)
    quant.encode(x, fmt, 64, payload)
    err = (quant.decode(payload, fmt, 64, n).double() - x.double()).abs()
    ratio = err / quant.error_bound(x, fmt, 64)
    assert ratio.max() <= 1.0
    assert ratio.max() > 0.5  # not a bound that nothing could break


def test_payload_sizes() -> None:
    assert quant.payload_bytes("int8", 1024, 128) == 1024 + 8 * 4
    assert quant.payload_bytes("int4", 1024, 128) == 512 + 8 * 4
    assert quant.payload_bytes("fp8_e4m3", 1000, 128) == 1024 + 8 * 4  # padded to 8 blocks


@pytest.mark.parametrize(
    "options",
    first_only(
        [
            {"fmt": "int8", "algo": "twoshot"},
            {"fmt": "fp8_e5m2", "inner": "shm"},
            {"fmt": "int4", "block": 32},
            {"fmt": "fp8_e4m3", "block": 256, "algo": "twoshot"},
            {"fmt": "int8", "min_bytes": 4096},  # the exact path below 4 KiB, quantized above
        ],
        2,
    ),
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_kit_bounds_every_format(pools, options: dict) -> None:
    pools(3).run(run_checks, "quantized", options, BOUND_CHECKS)


def _wire_and_error(options: dict) -> tuple[float, float, bool]:
    """(wire bytes relative to the library ring, max error, exact below min_bytes) on 1 MiB."""
    import torch.distributed as dist

    from framework import build_communicator

    r, p = dist.get_rank(), dist.get_world_size()
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(r))
    comm = build_communicator("quantized", **options)
    try:
        got = comm.all_reduce(x.clone()).wait()
        ratio = comm.stats.wire_bytes / (2 * (p - 1) * x.nbytes / p)
        ref = x.clone()
        dist.all_reduce(ref)
        small = torch.full((100,), float(r) + 0.1)
        exact = comm.all_reduce(small.clone()).wait()
        lib = small.clone()
        dist.all_reduce(lib)
        return ratio, float((got - ref).abs().max()), torch.equal(exact, lib)
    finally:
        comm.close()


def test_wire_bytes_and_gate(pools) -> None:
    int8 = pools(2).run(_wire_and_error, {"fmt": "int8", "min_bytes": 1024})[0]
    int4 = pools(2).run(_wire_and_error, {"fmt": "int4", "min_bytes": 1024})[0]
    # int8 sends a quarter of float32 plus a 4-byte scale per 128 values; int4 half of that
    assert int8[0] == pytest.approx((1 + 4 / 128) / 4, rel=1e-3)
    assert int4[0] == pytest.approx((0.5 + 4 / 128) / 4, rel=1e-3)
    assert 0 < int8[1] < int4[1]  # quantized: not exact, and coarser formats lose more
    assert int8[2] and int4[2]  # 400 bytes < min_bytes: the library's exact sum


def _overclaiming_kit() -> str:
    """A quantized strategy stating a quarter of its real bound must fail the kit."""
    from framework import register_strategy
    from strategies.quantized import Quantized

    @register_strategy("quantized_overclaims")
    class Overclaims(Quantized):
        def error_bound(self, op, inputs, rank):
            return super().error_bound(op, inputs, rank) / 4

    try:
        run_checks("quantized_overclaims", {}, ["exact_sums"])
    except AssertionError as e:
        return str(e)
    return "passed"


def test_kit_catches_an_overclaimed_bound(pools) -> None:
    for msg in pools(2).run(_overclaiming_kit):
        assert "beyond the strategy's stated error bound" in msg


def test_tp_inference_close_to_unsharded_and_identical_on_every_rank(pools) -> None:
    """TP 2 over an int8 wire: not the unsharded logits (the wire is lossy), close to them,
    and the same bits on both ranks (so both keep choosing the same tokens)."""
    from test_tp import tp_generate

    _, ref, _, _ = pools(1).run(tp_generate, "naive", {}, 1)[0]
    outs = pools(2).run(tp_generate, "quantized", {"fmt": "int8"}, 2)
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])
    err = float((outs[0][1] - ref).abs().max())
    assert 1e-5 < err < 0.05, err


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_the_top_of_the_float_range_decodes_finite_and_within_the_bound(fmt: str) -> None:
    """int8 decoded the largest float32 to inf (127 x (max / 127) rounds past max), outside
    its stated bound; float16 and bfloat16 maxima go through float32 and back."""
    top = torch.finfo(torch.float32).max
    values = torch.linspace(3.0e38, top, 500).tolist() + [top, -top]
    for dtype in (torch.float16, torch.bfloat16):
        values += [torch.finfo(dtype).max, -torch.finfo(dtype).max]
    for v in values:
        x = torch.tensor([v] + [1.0] * 7)
        out = torch.empty(quant.payload_bytes(fmt, 8, 8), dtype=torch.uint8)
        quant.encode(x, fmt, 8, out)
        got = quant.decode(out, fmt, 8, 8)
        assert torch.isfinite(got).all(), (fmt, v, got)
        assert ((got.double() - x.double()).abs() <= quant.error_bound(x, fmt, 8)).all(), (fmt, v)


def test_a_non_finite_input_spoils_only_its_block() -> None:
    """Documented behaviour: a block holding inf decodes to NaN (its scale is not finite);
    the other blocks keep their values."""
    x = torch.ones(16)
    x[3] = float("inf")
    out = torch.empty(quant.payload_bytes("int8", 16, 8), dtype=torch.uint8)
    quant.encode(x, "int8", 8, out)
    got = quant.decode(out, "int8", 8, 16)
    assert got[:8].isnan().all() and torch.equal(got[8:], torch.ones(8))
