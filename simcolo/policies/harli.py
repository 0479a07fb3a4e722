"""Harli (arXiv 2511.11729) and its co-location baselines: LoRA finetuning on the decode GPUs of a
prefill/decode disaggregated deployment.

* ``harli`` — per decode iteration, search the decode SM share (0.1 ... 0.9) and the finetune
  micro-batch (1 ... ``max_micro_batch``, as memory allows) that maximise finetune throughput
  ``mb * seq_len / (lora_step_s(mb) / lora_rate(share))`` (separable: the best mb is the most
  token-efficient one that fits, the best share the feasible one with the highest finetune rate)
  subject to the two-stage prediction
  ``decode_corun_s(B, kv + B * lookahead, share) <= TPOT SLO`` (stage one: the solo decode table at the
  batch's KV, looked ahead by the iterations a decode run may take before the next re-plan; stage two:
  the interference table's decode slowdown at that share beside LoRA). No feasible share: finetuning
  stops (a running micro-batch is aborted and recomputed later). Unified memory with decode priority.
* ``static_share`` — a fixed decode share and micro-batch, no latency check, and a static memory
  carve-out that decode cannot reclaim (the usual way to co-locate without Harli's parts).
* ``flexllm`` — token-level interleaving in the style of FlexLLM: finetune tokens ride in the decode
  iterations, so the two share the GPU *in time* (no overlap): the finetune's token budget per
  iteration is what stretches the decode iteration from its solo latency to ``decode_slo_fraction``
  (0.9) x the TPOT SLO, i.e. a time fraction ``1 - decode_solo / target`` (no finetuning when the solo
  decode already misses it; the headroom absorbs prefill stalls and KV growth, which a budget aimed
  at the SLO itself breaks); unified memory with decode priority, as Harli.

Decisions: the decode-side slowdown does not depend on the micro-batch size (the table measures one
finetune shape; a kernel's instantaneous contention does not grow with its length); the micro-batch
is bounded by memory and ``max_micro_batch``; ties go to the larger decode share.
"""
from __future__ import annotations

import math

from simcolo.policies.base import FinetunePolicy, knobs
from simcolo.policies.least_outstanding import least_outstanding

SHARES = tuple(round(0.1 * i, 1) for i in range(1, 10))


class _FinetuneBase(FinetunePolicy):
    config_keys = ("prefill_instances", "decode_instances", "max_micro_batch", "lookahead_iterations")

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        g = knobs(cfg)
        self.max_micro_batch = g.int("max_micro_batch", min=1)
        self.lookahead = g.int("lookahead_iterations", min=1)
        self.prefill_instances = g.int("prefill_instances", min=1)
        self.decode_instances = g.int("decode_instances", min=1)

    def route(self, request, instances, now):
        return least_outstanding(instances, now)

    def _mb_limit(self, state, predictor) -> int:
        blocks = state.lendable_blocks + state.held_blocks
        return min(self.max_micro_batch, predictor.lora_max_micro_batch(blocks))

    def _kv(self, state) -> int:
        return state.decode_kv_tokens + state.decode_batch * self.lookahead


def ranked_by_rate(predictor, shares) -> list:
    """(share, decode slowdown) of ``shares`` ordered by finetune rate, highest first (ties: the larger
    decode share; ``None``, plain streams, counts as the whole GPU)."""
    ranked = sorted(shares, key=lambda sh: (-predictor.lora_rate(sh), -(1.0 if sh is None else sh)))
    return [(sh, predictor.decode_slowdown(sh)) for sh in ranked]


class Harli(_FinetuneBase):
    name = "harli"

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        self._best_mb: dict[int, int] = {}
        self._order: list[tuple[float, float]] | None = None

    def _most_efficient_micro_batch(self, predictor, mb_max: int) -> int:
        """argmax over mb <= mb_max of tokens per solo second (the share scales every mb alike)."""
        best = self._best_mb.get(mb_max)
        if best is None:
            seq = predictor.seq_len
            rates = [mb * seq / predictor.lora_step_s(mb, seq) for mb in range(1, mb_max + 1)]
            best = self._best_mb[mb_max] = max(range(mb_max), key=lambda i: (rates[i], i)) + 1
        return best

    def plan_finetune(self, state, predictor, running_micro_batch):
        mb = running_micro_batch or self._mb_limit(state, predictor)
        if mb <= 0 or state.decode_batch == 0:
            return self._plan_without_decode(predictor, mb, running_micro_batch)
        solo = predictor.decode_solo_s(state.decode_batch, self._kv(state))
        return self._first_feasible(predictor, solo, predictor.tpot_slo_s, self._by_rate(predictor), mb,
                                    running_micro_batch)

    def _plan_without_decode(self, predictor, mb: int, running_micro_batch):
        """The plan when memory allows no micro-batch (``mb`` 0: none) or no decode batch runs (the finetune
        gets every SM)."""
        if mb <= 0:
            return None, 0, 0.0
        return None, (mb if running_micro_batch else self._most_efficient_micro_batch(predictor, mb)), 0.0

    def _first_feasible(self, predictor, solo: float, target: float, candidates, mb: int, running_micro_batch):
        """The search: finetune throughput ~ lora_rate(share), so the first (share, decode slowdown) of
        ``candidates`` (in decreasing-rate order) whose predicted co-run decode iteration ``solo x slowdown``
        is within ``target``; none feasible: micro-batch 0 (the finetune yields)."""
        for share, slowdown in candidates:
            predicted = solo * slowdown
            if predicted <= target:
                if not running_micro_batch:
                    mb = self._most_efficient_micro_batch(predictor, mb)
                return share, mb, predicted
        return None, 0, solo * predictor.decode_slowdown(SHARES[-1])

    def _by_rate(self, predictor) -> list[tuple[float, float]]:
        """(share, decode slowdown) ordered by finetune rate, highest first (ties: larger decode share)."""
        if self._order is None:
            self._order = ranked_by_rate(predictor, SHARES)
        return self._order


class StaticShare(_FinetuneBase):
    name = "static_share"
    static_memory = True
    config_keys = _FinetuneBase.config_keys + ("decode_share",)

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        self.share = knobs(cfg).fraction("decode_share", "(0, 1)")

    def plan_finetune(self, state, predictor, running_micro_batch):
        mb = running_micro_batch or self.max_micro_batch
        share = self.share if state.decode_batch else None
        predicted = predictor.decode_corun_s(state.decode_batch, self._kv(state), share) if state.decode_batch else 0.0
        return share, mb, predicted


class FlexLLM(_FinetuneBase):
    name = "flexllm"
    sharing = "time_slice"
    config_keys = _FinetuneBase.config_keys + ("decode_slo_fraction",)

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        self.target = knobs(cfg).fraction("decode_slo_fraction", "(0, 1]")

    def plan_finetune(self, state, predictor, running_micro_batch):
        mb = running_micro_batch or self._mb_limit(state, predictor)
        if mb <= 0:
            return None, 0, 0.0
        if state.decode_batch == 0:
            return None, mb, 0.0
        solo = predictor.decode_solo_s(state.decode_batch, self._kv(state))
        target = self.target * predictor.tpot_slo_s
        if solo >= target:
            return None, 0, solo
        # in whole percent, rounded down: the decode side keeps a little more than it needs, and the
        # budget does not change (re-timing both sides) at every iteration as the KV grows
        fraction = math.floor((1.0 - solo / target) * 100.0) / 100.0
        if fraction <= 0.0:
            return None, 0, solo
        return fraction, mb, solo / (1.0 - fraction)
