"""Alpha-beta-gamma cost model of every algorithm and schedule, for extrapolating past this host.

A message of ``n`` bytes over a link costs ``alpha + n * beta`` (latency plus bytes over
bandwidth); summing ``n`` bytes costs ``n * gamma``. The formulas per algorithm, for ``p``
ranks (Thakur, Rabenseifner and Gropp, "Optimization of collective communication operations
in MPICH", IJHPCA 2005; Sanders, Speck and Traeff 2009 for the pipelined tree; NCCL's tuning
model uses the same latency + bytes / bandwidth form per algorithm and protocol):

* ``naive`` (the library's ring all-reduce): reduce-scatter + all-gather,
  ``2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma``. nccl-tests' busbw = algbw * 2(p-1)/p
  is defined so that busbw equals the link bandwidth ``1/beta`` for a perfect ring.
* ``tree`` (binary reduce then broadcast, chunk-pipelined, ``k = ceil(n / c)`` chunks of ``c``
  bytes, depth ``d = floor(log2 p)``): ``2 (d + k - 1) alpha + 2 (d + k - 1) c beta * 2 +
  n gamma`` -- each tree step moves a chunk to or from two children.
* ``hierarchical`` over ``g`` ranks per node and ``m = p/g`` nodes: reduce to the node leader
  (tree on the intra link), ``naive`` ring of the leaders on the inter link, broadcast back.
* across nodes the library's ring and tree run one channel per NIC (a rail-optimised node has a
  NIC per GPU), so their inter-node bandwidth is ``nics_per_node`` times a NIC's; ``hierarchical``
  sends its leaders' ring from one rank per node, through one NIC.
* GPU presets (``nccl`` in the topology): the library's collectives follow NCCL's own tuning
  model (:mod:`.nccl`, constants of ``src/graph/tuning.cc``): per algorithm (ring, tree) and
  protocol (LL, LL128, Simple) a base latency, a latency per hop inside the node and across
  the network, and a share of the bus bandwidth, which is the node's on one or two nodes and
  the NICs' on more; :func:`library_time` takes the cheapest, as NCCL's tuner does. ``naive``
  is NCCL's ring; ``tree`` and ``hierarchical`` pay NCCL's per-protocol costs on their own
  steps.
* ``oneshot`` / ``twoshot`` (the custom all-reduce kernels of vLLM, SGLang and TensorRT-LLM over
  NVLink peer memory, constants ``custom_ar``): one-shot reads every peer's whole input in one
  stage, ``base + alpha + (p-1) n beta``; two-shot reduce-scatters then all-gathers,
  ``base + 2 alpha + 2(p-1)/p n beta``. Their crossover :func:`oneshot_crossover` is where the
  second stage's latency equals the bytes it saves.
* ``shm`` (shared memory, one host): per chunk two flag barriers, each waiting on ``p - 1``
  peers (``2 (p-1) alpha``; alpha is the flag round trip, or a context switch when there are
  more ranks than cores) and memory traffic of about ``(3 + 1/p) n`` bytes per rank (copy in,
  sum p slices of n/p, copy out) at memory bandwidth ``1/beta``.

In situ. Benchmarks time all-reduces back to back; in a model each one follows a stretch of
compute. Where the transport runs on the same cores as the compute (gloo or shared memory on
a CPU host), that costs more: the waiting rank has gone to sleep and must be woken, and the
transport's kernel and helper-thread work (TCP loopback, gloo's threads) takes cycles from the
compute around it. ``insitu_s`` in an algorithm's fitted constants is that extra cost per
all-reduce, measured by ``experiments.calibrate`` as a loop of compute segments with and
without an all-reduce after each; :func:`decode_step` adds it to every all-reduce. Presets
leave it 0: on a GPU the collective kernel is queued behind the compute on a stream.

Schedules: fusing ``k`` messages of ``n`` bytes costs one collective of ``k n`` bytes plus a
copy in and out of the bucket (``2 k n / copy_bw``) instead of ``k`` collectives; overlap with
compute leaves ``max(0, comm - overlappable compute)`` exposed. A TP layer's matmul and its
collective, composed, chunked into a pipeline, split by tokens, or fused with the epilogue's
passes over memory, are :mod:`.overlap`.

The constants live in topology files (``conf/topology/*.yaml``): presets from published figures
with the source of each number beside it, and ``this_host``, fitted by
``python -m experiments.calibrate`` from measured all-reduce times (:func:`fit_host`: least
squares of the formula's features per algorithm, so each algorithm gets its own effective alpha
and beta; :func:`add_insitu` adds the in-situ extra).

The package: :mod:`.topology` (links, presets, YAML), :mod:`.formulas` (the model),
:mod:`.nccl` (NCCL's tuning model, the presets' library), :mod:`.overlap` (a TP layer's
schedules), :mod:`.fits` (constants fitted from measurements, and the model's errors).
"""

from framework.costmodel.fits import (
    COMPUTE,
    add_insitu,
    allreduce_errors,
    decode_errors,
    fit,
    fit_host,
    median_error,
)
from framework.costmodel.formulas import (
    DecodeShape,
    allreduce_time,
    busbw_gbps,
    collective_time,
    decode_step,
    exposed_time,
    features,
    fused_time,
    host_features,
    insitu_time,
    library_time,
    oneshot_crossover,
    sequence_parallel_forward,
)
from framework.costmodel.topology import (
    ALGORITHMS,
    OP_KEYS,
    PEER_ALGORITHMS,
    TOPOLOGY_DIR,
    Link,
    Topology,
    load_topology,
    to_yaml,
)

__all__ = [
    "ALGORITHMS",
    "COMPUTE",
    "OP_KEYS",
    "PEER_ALGORITHMS",
    "TOPOLOGY_DIR",
    "DecodeShape",
    "Link",
    "Topology",
    "add_insitu",
    "allreduce_errors",
    "allreduce_time",
    "busbw_gbps",
    "collective_time",
    "decode_errors",
    "decode_step",
    "exposed_time",
    "features",
    "fit",
    "fit_host",
    "fused_time",
    "host_features",
    "insitu_time",
    "library_time",
    "load_topology",
    "median_error",
    "oneshot_crossover",
    "sequence_parallel_forward",
    "to_yaml",
]
