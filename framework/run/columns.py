"""The columns a reader compares strategies by: what ``experiments.infer`` prints per job, what
the report's table shows first and what every result carries (the tests check it). One list,
in a module that imports nothing, so the report reads it without loading torch."""

# what infer prints per job, the report tabulates first and every result carries
HEADLINE = (
    "strategy",
    "inner",
    "world_size",
    "micro_batches",
    "ttft_s",
    "itl_p50_s",
    "itl_p99_s",
    "decode_tokens_per_s",
    "allreduce_calls_per_token",
    "collectives_per_token",
    "exposed_comm_s",
    "exposed_comm_share",
    "buffer_allocs",
    "buffer_reuses",
)
