"""Cost predictions for policies, from the run's tables (``policies.base.CostPredictor``).

Both backends bind the same predictor to the policy: a live replay's policy predicts from the tables the
simulation ran on (what the policy would do in production), while the replay measures what really happens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from simcolo.training.memory import stage_layer_count, stage_matmul_fraction


@dataclass(frozen=True)
class TrainingShape:
    """What one training task is, as far as its costs go."""
    micro_batch: int
    seq_len: int
    rank: int                 # LoRA rank (finetuning)
    checkpointing: bool       # activation checkpointing: a backward recomputes its forward
    job: str = "full"         # full | lora: what a pipeline stage's task runs (``stage_costs``)


class TablePredictor:
    def __init__(self, cost, training_costs, interference, shape: TrainingShape, ttft_slo_s: float,
                 tpot_slo_s: float, block_bytes: float = 0.0, lora_activation_bytes: float | None = None,
                 model=None):
        self.cost, self.tc, self.interference = cost, training_costs, interference
        self.job = shape.job
        self.model = model        # a ModelSpec: how a LoRA step splits over pipeline stages
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        self.block_bytes = block_bytes
        self.micro_batch = shape.micro_batch
        self.seq_len = shape.seq_len
        self.rank = shape.rank
        self.checkpointing = shape.checkpointing
        self._stage_cache: dict[tuple[int, str], list[float]] = {}
        self._lora_cache: dict[tuple[int, int], float] = {}
        self._lora_optimizer: float | None = None
        self._lora_act_per_seq = lora_activation_bytes   # one sequence of seq_len tokens
        self._sd: dict[float | None, tuple[float, float]] = {}

    # ---------------------------------------------------------------- pipelines (full training or LoRA)
    def stage_costs(self, num_stages: int, phase: str) -> list[float]:
        """Per-stage solo seconds of one task's ``phase``; with activation checkpointing a backward
        recomputes its forward first. Full training: the ``train_stage`` table. LoRA: the whole model's
        ``lora_step`` time split over the stages by their share of the matrix-multiply work
        (``training.memory.stage_matmul_fraction``; the adapter optimizer by their share of the layers)."""
        key = (num_stages, phase)
        v = self._stage_cache.get(key)
        if v is None and self.job == "lora":
            v = self._stage_cache[key] = self._lora_stage_costs(num_stages, phase)
        if v is None:
            v = [self.tc.stage_s(num_stages, s, phase, self.micro_batch, self.seq_len) for s in range(num_stages)]
            if phase == "backward" and self.checkpointing:
                v = [b + f for b, f in zip(v, self.stage_costs(num_stages, "forward"))]
            self._stage_cache[key] = v
        return v

    def _lora_stage_costs(self, num_stages: int, phase: str) -> list[float]:
        m = self.model
        if phase == "optimizer":
            whole = self.lora_optimizer_s()
            return [whole * stage_layer_count(m, num_stages, s) / m.num_layers for s in range(num_stages)]
        whole = self.tc.lora_s(self.rank, phase, self.micro_batch, self.seq_len)
        return [whole * stage_matmul_fraction(m, num_stages, s) for s in range(num_stages)]

    def task_forward_s(self, num_stages: int) -> list[float]:
        return self.stage_costs(num_stages, "forward")

    def task_backward_s(self, num_stages: int) -> list[float]:
        return self.stage_costs(num_stages, "backward")

    def request_prefill_s(self, prompt_tokens: int) -> float:
        return self.cost.prefill_s(prompt_tokens, 1)

    # ---------------------------------------------------------------- decode + finetune (Harli)
    def decode_solo_s(self, batch: int, kv_tokens: int) -> float:
        """A decode iteration of ``batch`` sequences holding ``kv_tokens``; a sequence counted before it holds
        KV (queued, not yet admitted) counts one token, as it will once it decodes (the table's grid starts
        at one token per sequence)."""
        return self.cost.decode_s(batch, max(kv_tokens, batch))

    def decode_slowdown(self, share: float | None) -> float:
        """Stage two of the decode predictor: the co-run slowdown beside LoRA at ``share``."""
        sd = self._sd.get(share)
        if sd is None:
            sd = self._sd[share] = self.interference.slowdown("decode", "lora", share)
        return sd[0]

    def decode_corun_s(self, batch: int, kv_tokens: int, share: float | None) -> float:
        """Stage one: the solo decode iteration; stage two: its slowdown beside LoRA at ``share``."""
        return self.decode_solo_s(batch, kv_tokens) * self.decode_slowdown(share)

    def lora_rate(self, share: float | None) -> float:
        self.decode_slowdown(share)
        return 1.0 / self._sd[share][1]

    def lora_step_s(self, micro_batch: int, seq_len: int) -> float:
        key = (micro_batch, seq_len)
        v = self._lora_cache.get(key)
        if v is None:
            v = self._lora_cache[key] = (self.tc.lora_s(self.rank, "forward", micro_batch, seq_len)
                                         + self.tc.lora_s(self.rank, "backward", micro_batch, seq_len))
        return v

    def lora_optimizer_s(self) -> float:
        if self._lora_optimizer is None:
            self._lora_optimizer = self.tc.lora_s(self.rank, "optimizer", 1, self.seq_len)
        return self._lora_optimizer

    def lora_blocks(self, micro_batch: int, seq_len: int) -> int:
        if micro_batch <= 0:
            return 0
        return math.ceil(micro_batch * self._lora_act_per_seq * seq_len / self.seq_len / self.block_bytes)

    def lora_max_micro_batch(self, blocks: int) -> int:
        per = self._lora_act_per_seq / self.block_bytes
        return int(blocks // math.ceil(per)) if per > 0 else 0
