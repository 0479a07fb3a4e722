"""Requests longer than the model's context: the ``workload.overlength`` modes and their one rule.

A request is over-length when its prompt plus its output exceeds the model's ``max_context_len``
(vLLM's API server refuses a request whose prompt plus ``max_tokens`` exceeds ``max_model_len``).

* ``reject`` (the default, as vLLM): the workload passes it on unchanged and the serving system refuses
  it on arrival, recording it with status ``exceeds_context`` (counted as ``status_exceeds_context``).
* ``clip``: the workload shortens it to fit -- the prompt to ``max_context_len - 1`` tokens, then the
  output to what is left -- and counts it (``workload_num_clipped``).
"""
from __future__ import annotations

import numpy as np

MODES = ("reject", "clip")
STATUS = "exceeds_context"
KEY = "workload.overlength"


def exceeds_context(prompt_tokens, output_tokens, max_context_len: int):
    """Whether a request (or, on arrays, each request) is over-length."""
    return prompt_tokens + output_tokens > max_context_len


def clip(prompt: np.ndarray, output: np.ndarray, max_context_len: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, output) shortened to fit, and which prompts and which outputs were shortened."""
    prompt_clipped = prompt > max_context_len - 1
    prompt = np.minimum(prompt, max_context_len - 1)
    output_clipped = exceeds_context(prompt, output, max_context_len)
    return prompt, np.minimum(output, max_context_len - prompt), prompt_clipped, output_clipped


def notice(summary: dict, max_context_len: int) -> str | None:
    """The console line for a run that refused or clipped over-length requests (None if it did neither)."""
    what = f"longer than the model's context ({max_context_len:,} tokens, prompt + output)"
    refused, clipped = summary.get(f"status_{STATUS}", 0), summary.get("workload_num_clipped", 0)
    if refused:
        return (f"{refused:,} request(s) {what} refused with status {STATUS}; "
                f"{KEY}=clip shortens them to fit instead")
    if clipped:
        return (f"{clipped:,} request(s) {what} clipped to fit; "
                f"{KEY}=reject refuses them instead, as vLLM does")
    return None
