"""Memory: conservative estimates of what a measurement needs, and recognising out-of-memory.

The estimates decide, *before* a point runs, whether it can fit under ``max_memory_bytes`` (on the CPU
there is no allocator that fails cleanly, so this is the only guard; on CUDA an OOM is also caught). On
the CPU, where no allocator statistics exist, they are also what the tables record as
``peak_memory_bytes`` (metadata ``memory_method`` says so). They are upper bounds in the spirit of the
simulator's own memory model; all counts are bytes, ``b`` is the bytes per element of the dtype used.

* weights: the parameters of the layers built (decoder layers, embedding, final norm + LM head);
* KV cache: ``2 * layers * batch * kv_heads * max_len * head_dim * b``;
* inference activations of ``T`` tokens in ``n`` sequences of ``s`` tokens: ``T * (4h + 2i) * b`` for the
  hidden states, q/k/v/o and the SwiGLU intermediate, ``n * heads * s^2 * b`` for attention scores
  (an attention kernel without flash/mem-efficient paths materialises them; counted on the CPU only,
  see ``ATTENTION_SCORES``), fp32 logits of the
  sequences' last tokens (prefill) or of every token (training);
* training: weights + gradients of the trainable parameters + AdamW's two moments (in the parameter
  dtype, as ``torch.optim.AdamW`` keeps them) + the activations autograd saves, taken as 3x the
  inference activations of every layer.
"""
from __future__ import annotations

import gc

import torch

from simcolo.specs import ModelSpec


def weight_bytes(spec: ModelSpec, num_layers: int, embed: bool, head: bool, b: int) -> int:
    n = num_layers * spec.layer_params
    if embed:
        n += spec.embedding_params
    if head:
        n += spec.hidden_size + (spec.vocab_size * spec.hidden_size if (spec.lm_head_params or not embed) else 0)
    return n * b


def kv_cache_bytes(spec: ModelSpec, num_layers: int, batch: int, max_len: int, b: int) -> int:
    return 2 * num_layers * batch * spec.num_kv_heads * max_len * spec.head_dim * b


#: Whether attention materialises its score matrix. Set from the device by the harness: on CUDA, SDPA
#: runs flash / memory-efficient kernels that do not; on the CPU the math kernel may.
ATTENTION_SCORES = True


def activation_bytes(spec: ModelSpec, tokens: int, kv_len: int, b: int) -> int:
    """Activations of one layer's forward over ``tokens`` queries, each attending to ``kv_len`` keys
    (at inference only one layer's are alive at a time)."""
    h, i = spec.hidden_size, spec.intermediate_size
    scores = spec.num_attention_heads * tokens * kv_len * b if ATTENTION_SCORES else 0
    return tokens * (4 * h + 2 * i) * b + scores


def prefill_bytes(spec: ModelSpec, batch_tokens: int, num_seqs: int, b: int) -> int:
    s = batch_tokens // num_seqs
    return (weight_bytes(spec, spec.num_layers, True, True, b)
            + kv_cache_bytes(spec, spec.num_layers, num_seqs, s, b)
            + activation_bytes(spec, batch_tokens, s, b)
            + num_seqs * spec.vocab_size * 4)


def decode_bytes(spec: ModelSpec, batch_size: int, kv_tokens: int, b: int) -> int:
    return (weight_bytes(spec, spec.num_layers, True, True, b)
            + kv_cache_bytes(spec, spec.num_layers, batch_size, kv_tokens + 1, b)
            + activation_bytes(spec, batch_size, kv_tokens + 1, b)
            + batch_size * spec.vocab_size * 4)


def training_bytes(spec: ModelSpec, num_layers: int, embed: bool, head: bool, micro_batch: int,
                   seq_len: int, b: int, trainable_params: int | None = None) -> int:
    """Full-parameter AdamW when ``trainable_params`` is None, else (LoRA) only those are trained."""
    weights = weight_bytes(spec, num_layers, embed, head, b)
    trained = weights if trainable_params is None else trainable_params * b
    tokens = micro_batch * seq_len
    saved = 3 * num_layers * activation_bytes(spec, tokens, seq_len, b)
    logits = 3 * tokens * spec.vocab_size * 4 if head else 0
    return weights + 3 * trained + saved + logits + 2 * tokens * spec.hidden_size * b


def is_oom(exc: BaseException) -> bool:
    """An allocation failure that means "this point does not fit", not a bug."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release(device: torch.device) -> None:
    """Give memory back after a point (especially after an OOM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
