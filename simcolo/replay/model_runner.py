"""The real kernels a live replay runs: continuous-batching serving and full-parameter training of the
Llama in ``calibrate/model.py``.

``ServingRunner`` is one serving instance's engine: a slot KV cache (``SlotKVCache``) holding many
sequences of different lengths, a batched prefill of new prompts and a decode step over any subset of
the running sequences, each at its own position. It reuses the model's own submodules; only the
attention over a ragged cache is new. ``TrainingRunner`` runs forward / backward / AdamW on a whole
replica, the phases ``calibrate/measure_train.py`` times, and copies weights into a serving replica.
Training and serving may share one module (co-location where the serving replica *is* the training
replica): serving runs under ``torch.inference_mode`` and never touches gradients.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from calibrate.model import _SDPA_HAS_GQA, Block, Llama, apply_rope, attention


def _check_whole_model(model: Llama, who: str) -> None:
    if model.embed_tokens is None or model.lm_head is None or model.layer_range != range(model.spec.num_layers):
        raise ValueError(f"{who} needs a whole model (embedding, all {model.spec.num_layers} layers and the LM "
                         f"head); got layers {model.layer_range}, embed={model.embed_tokens is not None}, "
                         f"head={model.lm_head is not None}")


class SlotKVCache:
    """Preallocated K/V ``[num_layers, max_seqs, num_kv_heads, max_len, head_dim]`` for up to
    ``max_seqs`` sequences, one slot each, named by a hashable key (a request id).

    Occupied slots are kept contiguous at ``0..n-1`` (``release`` moves the last one into the hole), so
    a decode of all running sequences reads plain views ``k[layer, :n, :, :S]``, without a gather.
    The cache is zero-filled: positions beyond a slot's length are masked in attention, but masking
    only zeroes their weights, and 0 * NaN from uninitialised memory would still be NaN.
    """

    def __init__(self, num_layers: int, max_seqs: int, num_kv_heads: int, max_len: int, head_dim: int, *,
                 device, dtype):
        if max_seqs < 1 or max_len < 1:
            raise ValueError(f"SlotKVCache needs max_seqs >= 1 and max_len >= 1, got {max_seqs}, {max_len}")
        shape = (num_layers, max_seqs, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths: list[int] = []  # per occupied slot, in slot order
        self._keys: list[Hashable] = []  # slot -> key
        self._slot: dict[Hashable, int] = {}  # key -> slot

    @property
    def max_seqs(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def num_active(self) -> int:
        return len(self._keys)

    def keys(self) -> list[Hashable]:
        """Keys of the occupied slots, in slot order."""
        return list(self._keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot

    def slot(self, key: Hashable) -> int:
        try:
            return self._slot[key]
        except KeyError:
            raise KeyError(f"sequence {key!r} holds no slot in the KV cache") from None

    def length(self, key: Hashable) -> int:
        return self.lengths[self.slot(key)]

    def allocate(self, key: Hashable, length: int) -> int:
        """Give ``key`` the next free slot (``num_active``), holding ``length`` tokens."""
        if key in self._slot:
            raise ValueError(f"sequence {key!r} already holds slot {self._slot[key]}")
        if self.num_active >= self.max_seqs:
            raise ValueError(f"no free slot for sequence {key!r}: all {self.max_seqs} slots (max_seqs) are taken")
        if not 0 <= length <= self.max_len:
            raise ValueError(f"sequence {key!r}: length {length} is beyond max_len {self.max_len}")
        slot = self.num_active
        self._slot[key] = slot
        self._keys.append(key)
        self.lengths.append(length)
        return slot

    @torch.inference_mode()
    def release(self, key: Hashable) -> None:
        """Free ``key``'s slot and move the last occupied slot (its valid K/V, all layers) into it."""
        slot, last = self.slot(key), self.num_active - 1
        if slot != last:
            n = self.lengths[last]
            self.k[:, slot, :, :n] = self.k[:, last, :, :n]
            self.v[:, slot, :, :n] = self.v[:, last, :, :n]
            moved = self._keys[last]
            self._keys[slot], self.lengths[slot], self._slot[moved] = moved, n, slot
        del self._slot[key]
        self._keys.pop()
        self.lengths.pop()


def _attend_cached(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One query per row ``q`` ``[B, heads, 1, D]`` over cached ``k``/``v`` ``[B, kv_heads, S, D]``;
    ``mask`` ``[B, 1, 1, S]`` (True = attend) hides positions beyond each row's own length."""
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _block(block: Block, h: Tensor, cos: Tensor, sin: Tensor, attend) -> Tensor:
    """``Block.forward`` with the attention step replaced by ``attend(q, k, v)`` (after rope), which
    writes the new K/V to the cache and returns ``[B, heads, T, D]``; all weights are the block's."""
    a = block.attn
    b, t, _ = h.shape
    x = block.input_norm(h)
    q = a.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
    k = a.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
    v = a.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
    y = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    h = h + a.o_proj(y.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim))
    return h + block.mlp(block.post_attn_norm(h))


class ServingRunner:
    """Continuous-batching kernels of one serving instance over ``model`` (greedy sampling).

    ``prefill`` admits new sequences (one batched forward of their prompts), ``decode`` advances any
    running ones by one token each, ``release`` frees a finished one. Both return the next token ids as
    a CPU LongTensor: an engine needs them every step, and that device-to-host copy is also the step's
    synchronisation point on CUDA, as in real engines.
    """

    def __init__(self, model: Llama, max_seqs: int, max_len: int):
        _check_whole_model(model, "ServingRunner")
        if max_len > model.rope_cos.shape[0]:
            raise ValueError(f"max_len {max_len} is beyond max_context_len {model.rope_cos.shape[0]} of model "
                             f"'{model.spec.name}'")
        self.model = model
        p = model.embed_tokens.weight
        self.device = p.device
        spec = model.spec
        self.cache = SlotKVCache(len(model.layers), max_seqs, spec.num_kv_heads, max_len, spec.head_dim,
                                 device=p.device, dtype=p.dtype)

    # --- bookkeeping -------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return self.cache.num_active

    def keys(self) -> list[Hashable]:
        return self.cache.keys()

    def length(self, key: Hashable) -> int:
        return self.cache.length(key)

    def release(self, key: Hashable) -> None:
        self.cache.release(key)

    # --- kernels -----------------------------------------------------------------------------------
    def prefill(self, items: Sequence[tuple[Hashable, Tensor]]) -> Tensor:
        """Admit ``(key, prompt ids [T])`` pairs; returns each one's greedy next token, ``[n]`` on CPU."""
        return self._prefill_logits(items).argmax(-1).cpu()

    def decode(self, keys: Sequence[Hashable], ids: Tensor) -> Tensor:
        """Feed ``ids[i]`` to sequence ``keys[i]``; returns the greedy next tokens ``[B]`` on CPU, in the
        order of ``keys``."""
        return self._decode_logits(keys, ids).argmax(-1).cpu()

    @torch.inference_mode()
    def _prefill_logits(self, items: Sequence[tuple[Hashable, Tensor]]) -> Tensor:
        """Logits ``[n, vocab]`` at each prompt's last token.

        The prompts run as one batch, right-padded to the longest: with causal attention a real token
        never sees the padding after it. The new slots are ``n0..n0+n-1``, so each layer's K/V land with
        one slice copy, padding included: positions past a slot's length are masked in decode and
        overwritten as it grows.
        """
        cache, model = self.cache, self.model
        keys = [key for key, _ in items]
        lens = [int(ids.numel()) for _, ids in items]
        if not items:
            raise ValueError("prefill of no sequences")
        if len(set(keys)) != len(keys):
            raise ValueError(f"prefill: duplicate keys in one batch: {keys}")
        for key, t in zip(keys, lens):
            if key in cache:
                raise ValueError(f"sequence {key!r} already holds slot {cache.slot(key)}")
            if not 1 <= t <= cache.max_len:
                raise ValueError(f"sequence {key!r}: prompt of {t} tokens must be within [1, max_len="
                                 f"{cache.max_len}]")
        if cache.num_active + len(items) > cache.max_seqs:
            raise ValueError(f"no free slot: {cache.num_active} running + {len(items)} new sequences > "
                             f"max_seqs {cache.max_seqs}")
        n0, n, t_max = cache.num_active, len(items), max(lens)
        padded = torch.zeros(n, t_max, dtype=torch.long)
        for row, (_, ids) in enumerate(items):
            padded[row, :lens[row]] = ids.reshape(-1)
        for key, t in zip(keys, lens):
            cache.allocate(key, t)

        def attend(layer):
            def write_and_attend(q, k, v):
                cache.k[layer, n0:n0 + n, :, :t_max] = k
                cache.v[layer, n0:n0 + n, :, :t_max] = v
                return attention(q, k, v)
            return write_and_attend

        cos, sin = model.rope_cos[:t_max], model.rope_sin[:t_max]
        h = model.embed_tokens(padded.to(self.device, non_blocking=True))
        for i, block in enumerate(model.layers):
            h = _block(block, h, cos, sin, attend(i))
        last = torch.tensor(lens, device=self.device) - 1
        h = h[torch.arange(n, device=self.device), last]
        return model.lm_head(model.norm(h))

    @torch.inference_mode()
    def _decode_logits(self, keys: Sequence[Hashable], ids: Tensor) -> Tensor:
        """Logits ``[B, vocab]`` of one decode step, rows in the order of ``keys``.

        Rows run in slot order. When their slots form a contiguous range (all running sequences, the
        common case) the cache is read through views; otherwise each layer's K/V are gathered.
        """
        cache, model = self.cache, self.model
        if len(set(keys)) != len(keys):
            raise ValueError(f"decode: duplicate keys {list(keys)}")
        ids = ids.reshape(-1)
        if ids.numel() != len(keys):
            raise ValueError(f"decode: {len(keys)} keys but {ids.numel()} token ids")
        slots = [cache.slot(key) for key in keys]
        for key, s in zip(keys, slots):
            if cache.lengths[s] >= cache.max_len:
                raise ValueError(f"sequence {key!r}: KV cache full at max_len {cache.max_len} tokens")
        b = len(keys)
        order = sorted(range(b), key=slots.__getitem__)  # row r of the batch is caller's row order[r]
        slots = [slots[i] for i in order]
        pos_list = [cache.lengths[s] for s in slots]
        lo, s_max = slots[0], max(pos_list) + 1
        contiguous = slots[-1] - lo == b - 1
        dev = self.device
        perm = None if order == list(range(b)) else torch.tensor(order, device=dev)
        ids = ids.to(dev, non_blocking=True)
        if perm is not None:
            ids = ids[perm]
        pos = torch.tensor(pos_list, device=dev)
        rows = torch.arange(b, device=dev)
        slot_t = None if contiguous else torch.tensor(slots, device=dev)
        # a uniform batch needs no mask (and may take a faster SDPA kernel)
        mask = None if min(pos_list) == s_max - 1 else \
            (torch.arange(s_max, device=dev)[None, :] <= pos[:, None])[:, None, None, :]

        def attend(layer):
            def write_and_attend(q, k, v):
                if contiguous:  # views of the rows' slots: no copy
                    kl, vl = cache.k[layer, lo:lo + b], cache.v[layer, lo:lo + b]
                    kl[rows, :, pos], vl[rows, :, pos] = k[:, :, 0], v[:, :, 0]
                    kl, vl = kl[:, :, :s_max], vl[:, :, :s_max]
                else:  # write into the slots, then gather their prefixes
                    cache.k[layer][slot_t, :, pos], cache.v[layer][slot_t, :, pos] = k[:, :, 0], v[:, :, 0]
                    kl, vl = cache.k[layer][slot_t, :, :s_max], cache.v[layer][slot_t, :, :s_max]
                return _attend_cached(q, kl, vl, mask)
            return write_and_attend

        cos, sin = model.rope_cos[pos][:, None, None, :], model.rope_sin[pos][:, None, None, :]
        h = model.embed_tokens(ids[:, None])
        for i, block in enumerate(model.layers):
            h = _block(block, h, cos, sin, attend(i))
        logits = model.lm_head(model.norm(h[:, 0]))
        for s in slots:
            cache.lengths[s] += 1
        if perm is not None:  # back to the caller's order
            logits = logits[torch.argsort(perm)]
        return logits


class TrainingRunner:
    """Full-parameter training of one whole replica on one device, in the three phases
    ``calibrate/measure_train.py`` times: forward (with the float32 loss), backward, AdamW step."""

    def __init__(self, model: Llama, lr: float = 1e-5):
        _check_whole_model(model, "TrainingRunner")
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> Tensor:
        """Cross-entropy loss (float32, as calibrated) of ``ids`` ``[mb, seq]``, autograd recording.

        ``targets`` default to the next tokens, the last position wrapping round to the row's first:
        the loss then covers all ``mb * seq`` positions, the same work as the calibrated forward.
        """
        if targets is None:
            targets = ids.roll(-1, dims=1)
        logits = self.model(ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of ``loss`` into the parameters."""
        loss.backward()

    def forward_backward(self, ids: Tensor, targets: Tensor | None = None) -> float:
        loss = self.forward(ids, targets)
        self.backward(loss)
        return loss.item()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def copy_weights_to(self, dst: Llama) -> int:
        """Weight sync: ``dst``'s parameters <- this model's, in place (converting dtype if they differ).
        Returns the bytes written to ``dst`` (0 when ``dst`` is this very module: co-located replicas
        that share weights need no sync)."""
        if dst is self.model:
            return 0
        src, out = dict(self.model.named_parameters()), dict(dst.named_parameters())
        if src.keys() != out.keys():
            raise ValueError(f"copy_weights_to: parameter names differ ({sorted(src.keys() ^ out.keys())[:4]})")
        copied = 0
        for name, p in out.items():
            if p.shape != src[name].shape:
                raise ValueError(f"copy_weights_to: {name} has shape {tuple(p.shape)}, source "
                                 f"{tuple(src[name].shape)}")
            p.copy_(src[name], non_blocking=True)
            copied += p.nbytes
        return copied
