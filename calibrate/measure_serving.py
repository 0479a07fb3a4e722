"""The two required tables: prefill and decode iterations of the whole model.

* ``prefill`` point ``(batch_tokens, num_seqs)``: ``num_seqs`` random prompts of ``batch_tokens //
  num_seqs`` tokens each (grids must make that division exact), one forward pass that writes a fresh
  KV cache and projects only each sequence's last token to logits, as a serving engine does.
* ``decode`` point ``(batch_size, kv_tokens_per_seq)``: a KV cache filled with ``kv_tokens_per_seq``
  random tokens per sequence, and one forward pass of one new token per sequence; the cache length is
  reset before every call, so every timed call attends to the same number of tokens.

Both run under ``torch.inference_mode()`` with the model in the calibration dtype (bf16 on CUDA,
fp32 on CPU).
"""
from __future__ import annotations

from typing import Any

import torch

from calibrate import memory
from calibrate.context import Context
from calibrate.grids import axis
from simcolo.errors import ConfigError


def _full_model(ctx: Context, seq_len: int):
    from calibrate.model import build_model

    spec = ctx.spec_for_length(seq_len)
    return ctx.model(("full", spec.max_context_len),
                     lambda: build_model(spec, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed).eval())


def _row(point: dict[str, Any], timing, estimate: int) -> dict[str, Any]:
    return {**point, "latency_s": timing.median_s, "latency_std_s": timing.std_s, "repeats": timing.repeats,
            "peak_memory_bytes": timing.peak_memory_bytes if timing.peak_memory_bytes is not None else estimate}


class PrefillMeasurer:
    table = "prefill"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.tokens = axis(grid, where, "batch_tokens", min_len=2)
        self.seqs = axis(grid, where, "num_seqs", min_len=2)
        bad = [(t, n) for t in self.tokens for n in self.seqs if t % n]
        if bad:
            raise ConfigError(f"{where}: every batch_tokens must be a multiple of every num_seqs (the "
                              f"table is a full grid and each point needs sequences of equal whole "
                              f"length); not so for (batch_tokens, num_seqs) {bad[:5]}")
        self.longest = max(self.tokens) // min(self.seqs)

    def points(self) -> list[dict[str, Any]]:
        return [{"batch_tokens": t, "num_seqs": n} for t in self.tokens for n in self.seqs]

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        return memory.prefill_bytes(self.ctx.spec, p["batch_tokens"], p["num_seqs"], self.ctx.dtype_bytes)

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        from calibrate.model import KVCache

        ctx = self.ctx
        n = p["num_seqs"]
        s = p["batch_tokens"] // n
        model = _full_model(ctx, max(self.longest, ctx.spec.max_context_len))
        ids = ctx.random_ids((n, s), salt=1)
        cache = KVCache(ctx.spec, n, s, device=ctx.device, dtype=ctx.dtype)
        return [_row(p, _time_forward(ctx, model, ids, cache, 0), self.estimate_bytes(p))]

    def close(self) -> None:
        pass


class DecodeMeasurer:
    table = "decode"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.batches = axis(grid, where, "batch_size", min_len=2)
        self.kvs = axis(grid, where, "kv_tokens_per_seq", min_len=2)
        self.longest = max(self.kvs) + 1

    def points(self) -> list[dict[str, Any]]:
        return [{"batch_size": b, "kv_tokens_per_seq": k} for b in self.batches for k in self.kvs]

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        return memory.decode_bytes(self.ctx.spec, p["batch_size"], p["kv_tokens_per_seq"], self.ctx.dtype_bytes)

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        from calibrate.model import KVCache

        ctx = self.ctx
        b, kv = p["batch_size"], p["kv_tokens_per_seq"]
        model = _full_model(ctx, max(self.longest, ctx.spec.max_context_len))
        cache = KVCache.filled(ctx.spec, b, kv, kv + 1, device=ctx.device, dtype=ctx.dtype,
                               generator=ctx.generator(2))
        ids = ctx.random_ids((b, 1), salt=3)
        return [_row(p, _time_forward(ctx, model, ids, cache, kv), self.estimate_bytes(p))]

    def close(self) -> None:
        pass


def _time_forward(ctx: Context, model, ids, cache, cached_len: int):
    """Time one serving forward (logits of the last token only) from a cache holding ``cached_len``
    tokens; the cache length is reset before every call so each repetition does the same work."""
    def step():
        cache.length = cached_len
        model(ids, cache, last_token_logits_only=True)

    with torch.inference_mode():
        return ctx.timer(step)
