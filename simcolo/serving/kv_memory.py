"""How much GPU memory a serving instance gives its paged KV cache (vLLM-style preallocation)."""
from __future__ import annotations

from dataclasses import dataclass

from simcolo.errors import ConfigError
from simcolo.specs import GPUSpec, ModelSpec


@dataclass(frozen=True)
class KVBudget:
    weights_bytes: float        # per GPU
    activations_bytes: float    # per GPU, reserved for the largest iteration
    block_bytes: float          # per GPU, one block of ``block_size`` tokens
    num_blocks: int


def activation_reserve_bytes(model: ModelSpec, tp: int, max_batched_tokens: int, max_num_seqs: int) -> float:
    """Peak activation memory of the largest iteration, per GPU.

    Hidden states, q/k/v/o and the SwiGLU intermediate for every batched token, plus float32 logits
    for every sequence (only the last token of each is projected). An estimate in the spirit of
    vLLM's profiling run; documented so that a measured figure can replace it.
    """
    per_token = (4 * model.hidden_size + 2 * model.intermediate_size) * model.dtype_bytes / tp
    logits = max_num_seqs * model.vocab_size * 4 / tp
    return max_batched_tokens * per_token + logits


def kv_budget(model: ModelSpec, gpu: GPUSpec, tp: int, block_size: int, gpu_memory_utilization: float,
              max_batched_tokens: int, max_num_seqs: int, num_blocks_override: int | None = None,
              reserved_bytes: float = 0.0, reserved_for: str = "") -> KVBudget:
    """KV blocks per instance: what fits after weights, activations and ``reserved_bytes`` per GPU
    (co-located training: its gradients, optimizer state and activations), or exactly
    ``num_blocks_override`` (vLLM's ``num_gpu_blocks_override``) if that fits."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"serving.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    weights = model.weight_bytes / tp
    acts = activation_reserve_bytes(model, tp, max_batched_tokens, max_num_seqs)
    block_bytes = block_size * model.kv_bytes_per_token / tp
    usable = gpu.memory_bytes * gpu_memory_utilization
    left = usable - weights - acts - reserved_bytes
    num_blocks = int(left // block_bytes) if left > 0 else 0
    if num_blocks_override is not None:
        if not 1 <= num_blocks_override <= num_blocks:
            raise ConfigError(f"serving.num_gpu_blocks_override={num_blocks_override} is not in [1, {num_blocks}]: "
                              f"that many KV blocks of model '{model.name}' fit on gpu '{gpu.name}' with "
                              f"serving.tp={tp} and gpu_memory_utilization={gpu_memory_utilization}")
        return KVBudget(weights, acts, block_bytes, num_blocks_override)
    need_blocks = -(-model.max_context_len // block_size)
    if num_blocks < need_blocks:
        raise ConfigError(
            f"model '{model.name}' does not fit gpu '{gpu.name}' with serving.tp={tp}: "
            f"{usable / 1e9:.1f} GB usable (gpu_memory_utilization={gpu_memory_utilization}) - "
            f"{weights / 1e9:.1f} GB weights - {acts / 1e9:.1f} GB activations"
            + (f" - {reserved_bytes / 1e9:.1f} GB {reserved_for}" if reserved_bytes else "") + " leaves "
            f"{max(left, 0) / 1e9:.2f} GB = {num_blocks} KV blocks; expected at least {need_blocks} "
            f"blocks for one {model.max_context_len}-token sequence ("
            + ("shrink the training's memory: fewer training.state_bytes_per_param, a smaller "
               "training.micro_batch / seq_len / max_inflight, or more training.stages" if reserved_bytes else
               "raise serving.tp or use a larger GPU") + ")")
    return KVBudget(weights, acts, block_bytes, num_blocks)
