"""A TP op pair, a matmul and the collective that reduces it, done four ways (pure math).

Seconds, from the compute ``t_m`` of the matmul and the collective's time ``comm(n)`` on ``n``
bytes (the library's or a custom kernel's, :mod:`.formulas`):

* composed: ``t_m + comm(n)``, one after the other.
* chunked into ``c`` (commlab's ``overlap``; PyTorch async-TP's ``fused_matmul_reduce_scatter``
  and ``fused_all_gather_matmul``, Flux per tile): chunk i's transfer runs while chunk i+1 is
  multiplied, a two-stage pipeline. Each chunk computes ``t_m / c`` and moves ``n / c`` bytes,
  paying the collective's whole start-up: ``fill + (c-1) max(t_m/c, comm(n/c)) + drain``
  with fill ``t_m/c`` (nothing to send yet) and drain ``comm(n/c)`` (nothing left to
  multiply), plus one start-up (``kernel_s``) per chunk past the first. c = 1 is composed.
  ``t_m / c`` holds when chunks split the matmul's output (Flux's tiles; async-TP's rows in
  prefill); chunks of a decode batch's few tokens would each read the whole weight.
* token split in two (commlab's ``token_split``, TokenWeave): the batch's tokens in two halves,
  one half's reduction in flight while the other half computes. Across a layer every half-block
  overlaps the reduction before it, so in steady state each costs ``max(its compute, comm(n/2))``.
* fused epilogue (commlab's ``all_reduce_add_rmsnorm``; TensorRT-LLM's ``RESIDUAL_RMS_NORM``):
  composed, the all-reduce writes the sum, the residual add reads 2 tensors and writes 1, the
  norm reads 1 (2 if it makes a statistics pass) and writes 1, two kernels; fused, the
  all-reduce reads the residual and writes the residual and the normed output instead of the
  sum, in its own kernel. Saved: ``2 + norm_reads`` passes over the tensor at HBM bandwidth
  and two kernels.

While compute overlaps a transfer the collective's kernel holds ``comm_sm_share`` of the SMs,
so the overlapped compute runs ``1 / (1 - share)`` times longer. Compute is a roofline:
``max(flops / (peak x efficiency), bytes / HBM bandwidth)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from framework.costmodel.topology import Topology


def roofline_time(topo: Topology, flops: float, nbytes: float) -> float:
    """Seconds of a kernel doing ``flops`` and moving ``nbytes`` through HBM."""
    if topo.peak_tflops <= 0 or topo.hbm_gbps <= 0:
        raise ValueError(f"topology {topo.name!r} needs peak_tflops and hbm_gbps for compute")
    return max(
        flops / (topo.peak_tflops * 1e12 * topo.matmul_efficiency), nbytes / (topo.hbm_gbps * 1e9)
    )


def matmul_time(topo: Topology, rows: int, k: int, cols: int, dtype_bytes: int = 2) -> float:
    """``[rows, k] x [k, cols]``: 2 rows k cols flops; both inputs read, the output written."""
    nbytes = (rows * k + k * cols + rows * cols) * dtype_bytes
    return roofline_time(topo, 2.0 * rows * k * cols, nbytes)


def composed_time(compute_s: float, comm_s: float) -> float:
    return compute_s + comm_s


def chunked_time(
    compute_s: float,
    comm: Callable[[float], float],
    n: float,
    chunks: int,
    start_s: float = 0.0,
    sm_share: float = 0.0,
) -> float:
    """The pipeline of ``chunks`` (see the module docstring); ``comm(bytes)`` -> seconds."""
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    part, moved = compute_s / chunks, comm(n / chunks)
    steady = (chunks - 1) * max(part / (1.0 - sm_share), moved)
    return part + steady + moved + (chunks - 1) * start_s


def token_split_time(
    half_compute_s: Sequence[float], half_comm_s: float, sm_share: float = 0.0
) -> float:
    """Steady state of a token-split layer: each half-block, in order, overlaps the
    reduction of the half-block before it (``half_comm_s``: one half's collective)."""
    return sum(max(c / (1.0 - sm_share), half_comm_s) for c in half_compute_s)


COMPOSED_EPILOGUE = (3, 1)  # the add's passes (read 2, write 1); the norm's writes
FUSED_EXTRA_PASSES = 2  # read the residual, write residual and output, but not the sum


def epilogue_time(topo: Topology, nbytes: float, fused: bool, norm_reads: int = 1) -> float:
    """Residual add and RMSNorm after the all-reduce of ``nbytes``: composed, passes and two
    kernels; fused into the all-reduce, the passes it adds (see the module docstring)."""
    add, norm_writes = COMPOSED_EPILOGUE
    passes = FUSED_EXTRA_PASSES if fused else add + norm_reads + norm_writes
    kernels = 0 if fused else 2
    return passes * nbytes / (topo.hbm_gbps * 1e9) + kernels * topo.kernel_s


def epilogue_saving(topo: Topology, nbytes: float, norm_reads: int = 1) -> float:
    """Seconds the fused epilogue saves per all-reduce: ``2 + norm_reads`` passes, 2 kernels."""
    return epilogue_time(topo, nbytes, False, norm_reads) - epilogue_time(topo, nbytes, True)
