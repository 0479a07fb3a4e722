"""GPU memory of training, per pipeline stage: parameters, gradients and optimizer state, and the
activations one micro-batch holds from its forward to its backward. Analytical estimates, documented
so that measured peaks (calibrate/'s ``peak_memory_bytes``) can replace them.
"""
from __future__ import annotations

from dataclasses import dataclass

from simcolo.costs.schema import stage_layers
from simcolo.specs import ModelSpec

#: Activation bytes per token per decoder layer for a Llama block in bf16 with a fused (flash)
#: attention kernel and no recomputation: ~34 · hidden (Korthikanti et al. 2022, "Reducing
#: Activation Recomputation", without the s² attention-score term that flash attention never stores).
ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 34
#: With full activation checkpointing a layer keeps only its bf16 input (2 · hidden bytes per token)
#: between forward and backward; one layer's full activations live during its recomputation.
CHECKPOINTED_BYTES_PER_TOKEN_PER_HIDDEN = 2
#: Tokens whose float32 logits (and their gradient) exist at once on the last stage when the loss is
#: computed in chunks (what memory-lean trainers do); without checkpointing, all tokens' logits.
LOSS_CHUNK_TOKENS = 1024


def stage_layer_count(model: ModelSpec, num_stages: int, stage: int) -> int:
    """Decoder layers of ``stage`` (the one split rule, ``costs.schema.stage_layers``)."""
    return len(stage_layers(model.num_layers, num_stages, stage))


def stage_params(model: ModelSpec, num_stages: int, stage: int) -> int:
    """Parameters held by ``stage``: its layers, the embedding on stage 0, final norm + LM head on the last."""
    p = stage_layer_count(model, num_stages, stage) * model.layer_params
    if stage == 0:
        p += model.embedding_params
    if stage == num_stages - 1:
        p += model.lm_head_params + model.hidden_size
    return p


@dataclass(frozen=True)
class StageMemory:
    weights_bytes: float       # the stage's weights (shared with a co-located serving replica)
    state_bytes: float         # gradients + optimizer state (+ master copy), beyond the weights
    activation_bytes: float    # held by one micro-batch from its forward to its backward
    trained_bytes: float       # bf16 bytes of what trains: a data-parallel all-reduce sums its gradients,
                               # a weight sync sends it to serving


def full_training_stage_memory(model: ModelSpec, num_stages: int, stage: int, micro_batch: int, seq_len: int,
                               state_bytes_per_param: float, checkpointing: bool = False) -> StageMemory:
    """``state_bytes_per_param`` counts everything training keeps per parameter *including* the bf16
    weights (e.g. 16: bf16 weights 2 + grads 2 + fp32 master 4 + Adam m, v 8; 12 without the master
    copy; 8 with bf16 Adam states). Activations held from forward to backward: 34·hidden bytes per
    token per layer, plus float32 logits and their gradient on the last stage; with
    ``checkpointing``, 2·hidden per token per layer plus one layer's 34·hidden during recomputation,
    and the logits of one loss chunk."""
    params = stage_params(model, num_stages, stage)
    weights = params * model.dtype_bytes
    tokens = micro_batch * seq_len
    layers = stage_layer_count(model, num_stages, stage)
    h = model.hidden_size
    if checkpointing:
        act = CHECKPOINTED_BYTES_PER_TOKEN_PER_HIDDEN * h * tokens * layers + ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN * h * tokens
        logit_tokens = min(tokens, LOSS_CHUNK_TOKENS)
    else:
        act = ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN * h * tokens * layers
        logit_tokens = tokens
    if stage == num_stages - 1:
        act += 2 * 4 * logit_tokens * model.vocab_size
    return StageMemory(weights, max(0.0, params * state_bytes_per_param - weights), float(act), weights)


def lora_stage_memory(model: ModelSpec, num_stages: int, stage: int, rank: int, micro_batch: int,
                      seq_len: int) -> StageMemory:
    """LoRA finetuning as pipeline stage ``stage`` of ``num_stages``: the stage's frozen bf16 weights, its
    layers' adapters with their optimizer state (12 bytes per adapter parameter, as :func:`lora_memory`),
    and one micro-batch's activations as in full training without checkpointing (back-propagating to the
    adapters needs the base's activations too). All-reduce and weight sync move the adapters only."""
    full = full_training_stage_memory(model, num_stages, stage, micro_batch, seq_len, model.dtype_bytes)
    adapter = stage_layer_count(model, num_stages, stage) * lora_params_per_layer(model, rank)
    trained = adapter * model.dtype_bytes
    return StageMemory(full.weights_bytes, adapter * 12.0, full.activation_bytes, trained)


def stage_matmul_fraction(model: ModelSpec, num_stages: int, stage: int) -> float:
    """The share of the model's matrix-multiply work per token that ``stage`` does: its layers, and the LM
    head on the last stage (the embedding is a lookup). How LoRA's whole-model step time is split over a
    pipeline's stages (:meth:`simcolo.layout.predictor.TablePredictor.stage_costs`)."""
    def work(s: int) -> float:
        w = stage_layer_count(model, num_stages, s) * model.layer_params
        return w + (model.lm_head_params if s == num_stages - 1 else 0)
    return work(stage) / sum(work(s) for s in range(num_stages))


def lora_params_per_layer(model: ModelSpec, rank: int) -> int:
    """Adapter parameters on q, k, v, o of one layer: rank · (in + out) per target."""
    h, kv = model.hidden_size, model.num_kv_heads * model.head_dim
    return rank * ((h + h) + (h + kv) + (h + kv) + (h + h))


def lora_params(model: ModelSpec, rank: int) -> int:
    """Adapter parameters on q, k, v, o of every layer."""
    return model.num_layers * lora_params_per_layer(model, rank)


def lora_memory(model: ModelSpec, rank: int, micro_batch: int, seq_len: int) -> tuple[float, float]:
    """(adapter + its AdamW state in bytes, activations of one micro-batch in bytes) for LoRA finetuning
    of the whole model on one GPU. The frozen base is the serving replica's weights (not counted here).
    Adapter: bf16 weights and grads, fp32 Adam m and v (12 bytes per adapter parameter). Activations:
    the base's activations are still needed to back-propagate to the adapters, so the same 34·hidden
    bytes per token per layer, plus float32 logits and their gradient."""
    adapter = lora_params(model, rank) * 12.0
    tokens = micro_batch * seq_len
    act = ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN * model.hidden_size * tokens * model.num_layers
    act += 2 * 4 * tokens * model.vocab_size
    return adapter, float(act)
