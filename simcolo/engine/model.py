"""A Llama-family decoder in plain torch, built from a ``ModelSpec`` with random weights.

Llama-2, Llama-3 and Qwen2.5 share one shape: token embedding, ``num_layers`` pre-norm blocks of
grouped-query attention with rotary position embeddings and a SwiGLU MLP, a final RMSNorm and an LM
head. That is all this file is. Weights are random (nothing is downloaded): calibration and live replay
need the real kernels at the real shapes, not a model that says anything sensible.

There is one block forward. What differs between training, a prefill and a decode is only *how the new
tokens attend*: among themselves (no cache), or over a KV cache that holds each sequence's earlier
tokens. ``Llama.forward`` takes that step as an ``Attend`` object (``NO_CACHE``, or one that
``engine/kv_cache.py`` makes for a batch of sequences), which also says at which rotary positions the new
tokens sit.

Module names follow Hugging Face's (``layers.3.attn.q_proj``, ``mlp.gate_proj``, ``lm_head``) so that
LoRA targets read the same (see ``engine/lora.py``). A ``Llama`` may also be one pipeline stage: a
contiguous range of layers (``stage_layers``), with or without the embedding and the head.
"""
from __future__ import annotations

import zlib
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.torch_version import TorchVersion

from simcolo.costs.schema import stage_layers as _split_layers
from simcolo.specs import ModelSpec

ROPE_THETA = 10000.0  # Llama-2's; Llama-3 uses 5e5, Qwen2.5 1e6. Latency does not depend on it.
NORM_EPS = 1e-5
INIT_STD = 0.02
_SDPA_HAS_GQA = TorchVersion(torch.__version__) >= "2.5"  # enable_gqa=... arrived in torch 2.5


def rope_tables(head_dim: int, max_len: int, theta: float = ROPE_THETA, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, ``[max_len, head_dim // 2]``, computed in float32 (positions
    in bf16 would be off by whole tokens beyond 256)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, heads, T, head_dim]`` by position; the two halves of the head dimension form
    the pairs (Hugging Face's "rotate_half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention of the T queries ``q`` ``[B, heads, T, D]`` over the S keys/values ``[B, kv_heads, S,
    D]`` (grouped-query: ``heads`` a multiple of ``kv_heads``).

    With ``mask`` (boolean, True = attend, broadcastable to ``[B, heads, T, S]``) that mask is all there
    is. Without one, the queries are taken to be the *last* T of the S positions, attending causally:
    SDPA's ``is_causal`` aligns its mask top-left, which is right only when T == S (no cache, or a
    prefill into an empty one); a single query sees everything and needs no mask; a chunk of several
    tokens after cached ones gets an explicit, bottom-right-aligned mask (a path that may fall back to a
    slower SDPA kernel).
    """
    t, s = q.shape[2], k.shape[2]
    causal = False
    if mask is None:
        causal = t > 1 and t == s
        if 1 < t < s:
            q_pos = torch.arange(s - t, s, device=q.device)
            mask = torch.arange(s, device=q.device)[None, :] <= q_pos[:, None]
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class Attend(Protocol):
    """How the new tokens of one forward attend, layer by layer.

    ``positions``: rotary position of the new tokens -- an int (that of the first one, the same in every
    row) or a LongTensor ``[B, T]`` (each row its own). ``num_layers`` and ``shape`` (rows, new tokens
    per row) are what the step was made for, or None where anything goes. Called with the layer's index
    in the module and the new tokens' rotated ``q`` ``[B, heads, T, D]``, ``k``, ``v`` ``[B, kv_heads, T,
    D]``, it returns their attention output ``[B, heads, T, D]`` (storing ``k``, ``v`` if it keeps a
    cache).
    """
    positions: int | Tensor
    num_layers: int | None
    shape: tuple[int, int] | None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class NoCache:
    """Attend without a KV cache: the new tokens are the whole sequence (training, a full forward)."""
    positions = 0
    num_layers = None
    shape = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v)


NO_CACHE = NoCache()


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = spec.num_attention_heads, spec.num_kv_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """``attend(q, k, v)`` (after rope) is the attention step proper; see ``Attend``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer; ``index`` is its position in the whole model."""

    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.index = index
        self.input_norm = nn.RMSNorm(spec.hidden_size, eps=NORM_EPS)
        self.attn = Attention(spec)
        self.post_attn_norm = nn.RMSNorm(spec.hidden_size, eps=NORM_EPS)
        self.mlp = MLP(spec)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, attend)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(nn.Module):
    """A Llama-family decoder, or one pipeline stage of it: ``layers`` = range of decoder layers held;
    ``embed``/``head`` say whether the stage holds the token embedding (first stage) / final norm +
    lm_head (last stage). With ``tie_embeddings`` the LM head shares the embedding's weight when the
    module holds both; a last stage without the embedding holds its own copy."""

    def __init__(self, spec: ModelSpec, layers: range | None = None, embed: bool = True, head: bool = True,
                 *, rope_theta: float = ROPE_THETA):
        super().__init__()
        self.spec = spec
        self.layer_range = range(spec.num_layers) if layers is None else layers
        if self.layer_range.step != 1 or not (0 <= self.layer_range.start <= self.layer_range.stop
                                              <= spec.num_layers):
            raise ValueError(f"layers {self.layer_range} is not a contiguous range within the model's "
                             f"{spec.num_layers} layers")
        self.rope_theta = rope_theta
        h = spec.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, h) if embed else None
        self.layers = nn.ModuleList(Block(spec, i) for i in self.layer_range)
        self.norm = nn.RMSNorm(h, eps=NORM_EPS) if head else None
        self.lm_head = nn.Linear(h, spec.vocab_size, bias=False) if head else None
        self.tie_weights()
        cos, sin = rope_tables(spec.head_dim, spec.max_context_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def is_whole(self) -> bool:
        """Embedding, every layer and the head: a model that maps token ids to logits."""
        return (self.embed_tokens is not None and self.lm_head is not None
                and self.layer_range == range(self.spec.num_layers))

    @property
    def max_positions(self) -> int:
        return self.rope_cos.shape[0]

    def tie_weights(self) -> None:
        if self.spec.tie_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x: Tensor, attend: Attend = NO_CACHE, *, last_token_logits_only: bool = False) -> Tensor:
        """``x``: token ids ``[B, T]`` if the module holds the embedding, else hidden states ``[B, T,
        hidden]``. Returns logits ``[B, T, vocab]`` (``[B, 1, vocab]`` with ``last_token_logits_only``)
        if the module holds the head, else hidden states ``[B, T, hidden]``."""
        h = self.hidden_states(x, attend)
        if self.lm_head is None:
            return h
        if last_token_logits_only:
            h = h[:, -1:]
        return self.logits(h)

    def hidden_states(self, x: Tensor, attend: Attend = NO_CACHE) -> Tensor:
        """The embedding (if held) and every layer held, attending through ``attend``."""
        b, t = x.shape[:2]
        if attend.num_layers is not None and attend.num_layers != len(self.layers):
            raise ValueError(f"the KV cache holds {attend.num_layers} layers; this model has {len(self.layers)}")
        if attend.shape is not None and attend.shape != (b, t):
            raise ValueError(f"the attention step was made for {attend.shape[0]} rows of {attend.shape[1]} "
                             f"new tokens; got {b} x {t}")
        pos = attend.positions
        if isinstance(pos, int):
            if pos + t > self.max_positions:
                raise ValueError(f"position {pos + t} is beyond max_context_len {self.max_positions} of "
                                 f"model '{self.spec.name}' (build it from a spec with a longer context)")
            cos, sin = self.rope_cos[pos:pos + t], self.rope_sin[pos:pos + t]
        else:  # each row at its own positions: [B, 1 (heads), T, head_dim / 2]
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        for layer, block in enumerate(self.layers):
            h = block(h, cos, sin, partial(attend, layer))
        return h

    def logits(self, h: Tensor) -> Tensor:
        """Final norm and LM head of hidden states ``[..., hidden]``."""
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random weights: normal(0, 0.02) for linear and embedding weights, zero biases, unit norms.

        Each weight is drawn from its own generator, seeded from ``seed`` and the weight's name *in the
        whole model* (``layers.17.mlp.up_proj``), so a pipeline stage holds exactly the weights of its
        layers in the full model, however the model is split; a tied LM head draws as the embedding.
        """
        self.tie_weights()
        for name, module in self.named_modules():
            if isinstance(module, nn.RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                gen = torch.Generator(device=module.weight.device)
                # one 32-bit value: the CPU generator (mt19937) drops higher bits of its seed
                gen.manual_seed(zlib.crc32(f"{seed}:{self._global_name(name)}".encode()))
                module.weight.normal_(0.0, INIT_STD, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        # fresh float32 tables: .to(dtype) in build_model converted the buffers with the weights
        self.rope_cos, self.rope_sin = rope_tables(self.spec.head_dim, self.spec.max_context_len,
                                                   self.rope_theta, device=self.rope_cos.device)

    def _global_name(self, name: str) -> str:
        if name.startswith("layers."):
            _, slot, rest = name.split(".", 2)
            return f"layers.{self.layers[int(slot)].index}.{rest}"
        if name == "lm_head" and self.spec.tie_embeddings:
            return "embed_tokens"
        return name


def build_model(spec: ModelSpec, *, device="cpu", dtype: torch.dtype | None = None, layers: range | None = None,
                embed: bool = True, head: bool = True, seed: int = 0, rope_theta: float = ROPE_THETA) -> Llama:
    """A ``Llama`` with seeded random weights (see ``Llama.init_weights``), in ``dtype`` (default:
    bfloat16 on CUDA, float32 elsewhere) on ``device``.

    The module is first laid out on the ``meta`` device and then allocated directly on ``device``, so an
    8B model never passes through host memory nor is initialised twice. ``device="meta"`` returns the
    unallocated model (for counting parameters).
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Llama(spec, layers, embed, head, rope_theta=rope_theta)
    model = model.to(dtype)
    model.tie_weights()  # .to() on meta replaces parameters, which unties them
    if device.type == "meta":
        return model
    model = model.to_empty(device=device)
    model.init_weights(seed)
    return model


def weight_sharing_copy(model: Llama) -> Llama:
    """A second ``Llama`` object over the very same parameter and buffer tensors as ``model``.

    Its submodules are its own, so one may be replaced in the copy (a LoRA wrapper, see
    ``engine/lora.py``) while ``model`` goes on computing exactly what it did.
    """
    with torch.device("meta"):  # no memory: every tensor is replaced by the model's below
        twin = Llama(model.spec, model.layer_range, model.embed_tokens is not None, model.lm_head is not None,
                     rope_theta=model.rope_theta)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner), attr, p)
    for name, b in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        twin.get_submodule(owner).register_buffer(attr, b, persistent=False)
    return twin.train(model.training)


def stage_layers(spec: ModelSpec, num_stages: int, stage: int) -> range:
    """The layers of pipeline stage ``stage`` of ``num_stages``: contiguous and as even as possible,
    the first ``num_layers % num_stages`` stages holding one layer more (the last stage also holds the
    LM head, the heaviest single matmul). The split is the one the training cost tables are keyed by
    (``simcolo.costs.schema.stage_layers``, which works from a layer count alone)."""
    try:
        return _split_layers(spec.num_layers, num_stages, stage)
    except ValueError as exc:
        raise ValueError(f"model '{spec.name}': {exc}") from None
