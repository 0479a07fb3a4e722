"""The two required tables: prefill and decode iterations of the whole model.

* ``prefill`` point ``(batch_tokens, num_seqs)``: ``num_seqs`` random prompts of ``batch_tokens //
  num_seqs`` tokens each (grids must make that division exact), one forward pass that writes their KV
  into the cache and projects only each sequence's last token to logits, and the greedy next tokens.
* ``decode`` point ``(batch_size, kv_tokens_per_seq)``: a KV cache holding ``kv_tokens_per_seq`` random
  tokens per sequence (the first one token fewer: a live batch is ragged, so the timed call takes the
  masked attention path a serving engine takes), and one forward pass of one new token per sequence;
  the lengths are reset before every call, so every timed call attends to the same number of tokens.

Both time the kernels the live replay runs (``simcolo.engine.runner.ServingRunner``: a slot KV
cache, continuous batching), so replay and tables measure the same thing, in the calibration dtype
(bf16 on CUDA, fp32 on CPU).
"""
from __future__ import annotations

from typing import Any


from calibrate import memory
from calibrate.context import Context
from calibrate.grids import axis
from simcolo.errors import ConfigError


def _full_model(ctx: Context, seq_len: int):
    from simcolo.engine.model import build_model

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
        model = _full_model(self.ctx, max(self.longest, self.ctx.spec.max_context_len))
        step = prefill_step(self.ctx, model, p["batch_tokens"], p["num_seqs"], salt=1)
        return [_row(p, self.ctx.timer(step), self.estimate_bytes(p))]

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
        model = _full_model(self.ctx, max(self.longest, self.ctx.spec.max_context_len))
        step = decode_step(self.ctx, model, p["batch_size"], p["kv_tokens_per_seq"], salt=2)
        return [_row(p, self.ctx.timer(step), self.estimate_bytes(p))]

    def close(self) -> None:
        pass


def prefill_step(ctx: Context, model, batch_tokens: int, num_seqs: int, salt: int):
    """One prefill iteration of ``num_seqs`` random prompts of ``batch_tokens // num_seqs`` tokens, as the
    replay's engine runs it (their slots are freed after each call, last first: nothing to move)."""
    from simcolo.engine.runner import ServingRunner

    s = batch_tokens // num_seqs
    runner = ServingRunner(model, num_seqs, s)
    ids = ctx.random_ids((num_seqs, s), salt=salt)
    items = [(i, ids[i]) for i in range(num_seqs)]

    def step():
        runner.prefill(items)
        for i in reversed(range(num_seqs)):
            runner.release(i)
    return step


def decode_step(ctx: Context, model, batch: int, kv: int, salt: int):
    """One decode iteration of ``batch`` sequences holding ``kv`` random tokens each (the first one
    fewer, so that the masked path of a ragged live batch is timed); lengths reset before each call."""
    from simcolo.engine.kv_cache import KVCache
    from simcolo.engine.runner import ServingRunner

    lengths = [max(0, kv - 1)] + [kv] * (batch - 1) if batch > 1 else [kv]
    p = model.embed_tokens.weight
    cache = KVCache.filled(model.spec, lengths, kv + 1, device=p.device, dtype=p.dtype,
                           generator=ctx.generator(salt))
    runner = ServingRunner(model, cache=cache)
    keys = list(range(batch))
    ids = ctx.random_ids((batch,), salt=salt + 1)

    def step():
        cache.lengths[:] = lengths
        runner.decode(keys, ids)
    return step
