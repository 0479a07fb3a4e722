"""One inference request: what the trace says about it, and what happened to it in a run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Request:
    """An inference request.

    ``id``, ``arrival_s``, ``prompt_tokens`` and ``output_tokens`` come from the workload (seconds since
    the workload's start; tokens as ints). The remaining fields are written by the serving model and
    the live backend; ``None`` means "did not happen".
    """

    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # --- outcome, filled by a backend ---
    instance: int = -1            # index of the (decode) instance that finished it
    prefill_instance: int = -1    # index of the prefill instance (disaggregated serving), else == instance
    scheduled_s: float | None = None    # first admission into a batch
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    model_version: int = -1       # version of the weights that served it (optimizer steps applied), -1: none
    status: str = "pending"       # "finished" or the reason it did not finish
    # --- progress bookkeeping used by the serving model ---
    generated: int = 0            # output tokens produced so far
    kv_len: int = 0               # tokens whose KV is in the cache (= prompt + generated - 1 once prefilled)
    kv_blocks: int = 0            # paged-KV blocks held on the current instance
    prefill_done: int = 0         # tokens of the current (chunked) prefill already processed
    needs_prefill: bool = True    # False once its KV arrived by transfer (disaggregated decode side)
    last_token_s: float = 0.0     # time its latest token was produced (for inter-token latency)
