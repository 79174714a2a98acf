"""Blockwise quantization for the wire: encode, decode, and the error each element may take.

A message is cut into blocks of ``block`` elements; each block is scaled by its own absolute
maximum and rounded to a narrow format (int8, int4 packed two per byte, fp8 e4m3 or e5m2),
with its scale sent beside it as float32. Encoding and decoding run in float32 whatever the
input dtype, so a decoded block is the same bits on every rank that decodes it: the property
a quantized all-reduce needs to keep TP ranks identical.

:func:`error_bound` states, per element, how far a decoded value may be from its input; the
conformance kit checks every quantized collective against it. A finite input decodes to a
finite value within the bound, up to the largest float32 (decoding clamps to it: 127 x (max /
127) rounds past it) and at the largest float16 and bfloat16 (the decoded magnitude exceeds the
block's maximum by a few float32 ulps at most, so casting back keeps it finite).

Non-finite inputs: a block holding an inf or a NaN (anywhere in it) decodes to NaN in every
element, in every format and on every rank alike: encoding writes a NaN scale and zero codes
for it (no NaN is ever cast to an integer, whose result is undefined), and every other block
decodes as usual. An exact strategy would keep the other elements and the inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny
_MAX = torch.finfo(torch.float32).max
_U = 2.0**-24  # float32 unit roundoff


@dataclass(frozen=True)
class Format:
    """A wire format: bits per element, the largest magnitude it holds after scaling, the
    half-unit of its last place relative to a value (floating formats; 0 for integers) and
    below its smallest normal (in scaled units)."""

    bits: int
    qmax: float
    rel: float  # |round(y) - y| <= rel |y| + sub (floating formats)
    sub: float
    torch_dtype: torch.dtype | None  # the float8 dtype, None for integers


FORMATS = {
    "int8": Format(8, 127.0, 0.0, 0.5, None),
    "int4": Format(4, 7.0, 0.0, 0.5, None),
    "fp8_e4m3": Format(8, 448.0, 2.0**-4, 2.0**-10, torch.float8_e4m3fn),
    "fp8_e5m2": Format(8, 57344.0, 2.0**-3, 2.0**-17, torch.float8_e5m2),
}
# the dtypes a quantized collective encodes; every other dtype takes the exact path
QUANTIZABLE = frozenset({torch.float32, torch.float16, torch.bfloat16})


def payload_bytes(fmt: str, numel: int, block: int) -> int:
    """Bytes on the wire for ``numel`` elements: the packed values, then one float32 scale per
    block (``block`` is a multiple of 8, so the scales start 4-byte aligned)."""
    blocks = -(-numel // block)
    return blocks * block * FORMATS[fmt].bits // 8 + 4 * blocks


def encode(x: Tensor, fmt: str, block: int, out: Tensor) -> None:
    """Quantize the flat tensor ``x`` into ``out`` (uint8, :func:`payload_bytes` long)."""
    f = FORMATS[fmt]
    n = x.numel()
    blocks = -(-n // block)
    xb = x.new_zeros(blocks * block, dtype=torch.float32)
    xb[:n].copy_(x.view(-1))
    xb = xb.view(blocks, block)
    scale = (xb.abs().amax(1, keepdim=True) / f.qmax).clamp_min_(_TINY)  # (blocks, 1)
    bad = ~scale.isfinite()  # a block holding inf or NaN: all NaN when decoded (docstring)
    scale.masked_fill_(bad, float("nan"))
    y = (xb / scale).masked_fill_(bad, 0.0).clamp_(-f.qmax, f.qmax)
    split = blocks * block * f.bits // 8
    if f.torch_dtype is not None:
        out[:split].copy_(y.to(f.torch_dtype).view(torch.uint8).view(-1))
    elif f.bits == 8:
        out[:split].copy_(y.round_().to(torch.int8).view(torch.uint8).view(-1))
    else:  # int4: q + 8 in [1, 15], two per byte, low nibble first
        q = (y.round_() + 8).to(torch.uint8).view(-1, 2)
        out[:split].copy_(q[:, 0] | (q[:, 1] << 4))
    out[split:].view(torch.float32).copy_(scale.view(-1))


def decode(payload: Tensor, fmt: str, block: int, numel: int) -> Tensor:
    """The float32 values of a payload written by :func:`encode` (a new flat tensor)."""
    f = FORMATS[fmt]
    blocks = -(-numel // block)
    split = blocks * block * f.bits // 8
    q = payload[:split]
    if f.torch_dtype is not None:
        y = q.view(f.torch_dtype).float()
    elif f.bits == 8:
        y = q.view(torch.int8).float()
    else:
        y = torch.stack(((q & 15), (q >> 4)), dim=1).view(-1).float() - 8
    scale = payload[split : split + 4 * blocks].view(torch.float32)
    out = (y.view(blocks, block) * scale.view(blocks, 1)).view(-1)[:numel]
    # q * scale can round past the largest float32 for a block whose maximum is near it
    # (3.4e38: 127 * (3.4e38 / 127) is inf); the input was finite and no larger, so clamp
    return out.clamp_(-_MAX, _MAX)


def error_bound(x: Tensor, fmt: str, block: int) -> Tensor:
    """Per element, the most :func:`decode` (:func:`encode` (x)) may differ from ``x``
    (float64): half a step of the format at the block's scale, plus float32 rounding of the
    scaling and the clamp. Flat ``x`` in any float dtype."""
    f = FORMATS[fmt]
    n = x.numel()
    blocks = -(-n // block)
    xb = torch.zeros(blocks * block, dtype=torch.float64)
    xb[:n] = x.view(-1).double()
    xb = xb.view(blocks, block)
    absmax = xb.abs().amax(1, keepdim=True)
    s = (absmax / f.qmax).clamp_min(_TINY)
    mag = xb.abs()
    step = f.rel * mag * (1 + 2**-20) + s * (f.sub + 2 * f.qmax * 2 * _U)
    return (step + 2 * _U * (absmax + s) + 2 * _U * mag).view(-1)[:n]
