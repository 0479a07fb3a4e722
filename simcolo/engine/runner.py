"""The real kernels a serving instance or a trainer runs on a ``Llama`` (``engine/model.py``).

* ``ServingRunner``: continuous batching over one ``KVCache``: prefill of new prompts or of chunks
  continuing them, a decode step over any subset of the running sequences (each at its own position), a
  Sarathi-style mixed iteration, moving a sequence to another instance; greedy sampling.
* ``TrainingRunner``: full-parameter forward / backward / AdamW of a whole replica (the phases
  ``calibrate/measure_train.py`` times), and the weight sync into a serving replica.
* ``LoraTrainingRunner``: LoRA adapters trained on top of the very model a ``ServingRunner`` serves,
  without changing what serving computes.
* ``StageTrainingRunner``: one pipeline stage of full-parameter training; chained stages compute what
  ``TrainingRunner`` computes on the whole model.

Training and serving may share one module (co-location where the serving replica *is* the training
replica): serving runs under ``torch.inference_mode`` and never touches gradients.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from simcolo.engine.kv_cache import KVCache
from simcolo.engine.lora import apply_lora
from simcolo.engine.model import Llama, weight_sharing_copy


def _check_whole_model(model: Llama, who: str) -> None:
    if not model.is_whole:
        raise ValueError(f"{who} needs a whole model (embedding, all {model.spec.num_layers} layers and the LM "
                         f"head); got layers {model.layer_range}, embed={model.embed_tokens is not None}, "
                         f"head={model.lm_head is not None}")


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy in float32 (as calibrated) over every position of ``logits`` ``[mb, seq, vocab]``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def default_targets(ids: Tensor) -> Tensor:
    """The next tokens, the last position wrapping round to the row's first: the loss then covers all
    ``mb * seq`` positions, the same work as the calibrated forward."""
    return ids.roll(-1, dims=1)


class ServingRunner:
    """Continuous-batching kernels of one serving instance over ``model`` (greedy sampling).

    ``prefill`` runs prompt tokens (whole prompts or chunks), ``decode`` advances running sequences by
    one token each, ``mixed`` does both in one iteration, ``release`` frees a finished sequence. They
    return the next token ids as a CPU LongTensor: an engine needs them every step, and that
    device-to-host copy is also the step's synchronisation point on CUDA, as in real engines.

    The cache is a new zero-filled one of ``max_seqs`` x ``max_len`` tokens, or ``cache`` when given
    (e.g. ``KVCache.filled`` to time a decode step).
    """

    def __init__(self, model: Llama, max_seqs: int | None = None, max_len: int | None = None, *,
                 cache: KVCache | None = None):
        _check_whole_model(model, "ServingRunner")
        p = model.embed_tokens.weight
        if cache is None:
            if max_seqs is None or max_len is None:
                raise ValueError("ServingRunner needs max_seqs and max_len, or a cache")
            cache = KVCache(model.spec, max_seqs, max_len, device=p.device, dtype=p.dtype)
        elif max_seqs is not None or max_len is not None:
            raise ValueError("ServingRunner takes max_seqs and max_len, or a cache, not both")
        if cache.max_len > model.max_positions:
            raise ValueError(f"max_len {cache.max_len} is beyond max_context_len {model.max_positions} of model "
                             f"'{model.spec.name}'")
        if cache.num_layers != len(model.layers):
            raise ValueError(f"the KV cache holds {cache.num_layers} layers; the model has {len(model.layers)}")
        self.model, self.cache, self.device = model, cache, p.device

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

    def export(self, key: Hashable) -> tuple[Tensor, Tensor]:
        """``key``'s K/V (see ``KVCache.export``): what prefill/decode disaggregation sends."""
        return self.cache.export(key)

    def import_sequence(self, key: Hashable, k: Tensor, v: Tensor) -> None:
        """Take in a sequence exported by another instance; decode it as if it had been prefilled here."""
        self.cache.import_sequence(key, k, v)

    # --- kernels -----------------------------------------------------------------------------------
    def prefill(self, items: Sequence[tuple[Hashable, Tensor]]) -> Tensor:
        """Run ``(key, token ids [T])`` pairs: a new key's ids are (the first chunk of) its prompt; a key
        already held continues at its current length, the chunk attending to the cached prefix and
        causally to itself. Returns each row's greedy next token, ``[n]`` on CPU: the first generated
        token when the chunk completes the prompt, meaningless otherwise."""
        return self.prefill_logits(items).argmax(-1).cpu()

    def decode(self, keys: Sequence[Hashable], ids: Tensor) -> Tensor:
        """Feed ``ids[i]`` to running sequence ``keys[i]``; returns the greedy next tokens ``[B]`` on CPU,
        in the order of ``keys``."""
        return self.decode_logits(keys, ids).argmax(-1).cpu()

    def mixed(self, prefill_items: Sequence[tuple[Hashable, Tensor]], decode_keys: Sequence[Hashable],
              decode_ids: Tensor) -> tuple[Tensor, Tensor]:
        """A Sarathi-style mixed iteration: prompt chunks and decode tokens in one scheduler step.
        Returns ``(prefill next tokens, decode next tokens)``, as ``prefill`` and ``decode`` would.

        It runs the chunks, then the decodes: two forwards, so the weights are read twice, where a fused
        engine would pack all tokens into one forward (ragged attention over one token dimension). The
        results are the same; the time is that of the two parts. A part with no rows is skipped (an
        empty ``[0]`` result). The decode rows are checked first, so a refused call changes nothing.
        """
        if decode_keys:
            self._check_decode(decode_keys, decode_ids)
        empty = torch.empty(0, dtype=torch.long)
        first = self.prefill(prefill_items) if prefill_items else empty
        second = self.decode(decode_keys, decode_ids) if decode_keys else empty
        return first, second

    @torch.inference_mode()
    def prefill_logits(self, items: Sequence[tuple[Hashable, Tensor]]) -> Tensor:
        """Logits ``[n, vocab]`` at each item's last token, in the order of ``items``.

        The chunks run as one batch, right-padded to the longest: with causal attention a real token
        never sees the padding after it.
        """
        if not items:
            raise ValueError("prefill of no sequences")
        chunks = [ids.reshape(-1) for _, ids in items]
        return self._run([key for key, _ in items], [int(c.numel()) for c in chunks], chunks)

    @torch.inference_mode()
    def decode_logits(self, keys: Sequence[Hashable], ids: Tensor) -> Tensor:
        """Logits ``[B, vocab]`` of one decode step, rows in the order of ``keys``."""
        self._check_decode(keys, ids)
        return self._run(list(keys), [1] * len(keys), ids.reshape(-1, 1))

    def _check_decode(self, keys: Sequence[Hashable], ids: Tensor) -> None:
        if len(set(keys)) != len(keys):
            raise ValueError(f"decode: duplicate keys {list(keys)}")
        if ids.numel() != len(keys):
            raise ValueError(f"decode: {len(keys)} keys but {ids.numel()} token ids")
        for key in keys:
            self.cache.slot(key)  # a KeyError naming the key: decode does not start sequences

    def _slot_order(self, keys: list[Hashable]) -> list[int]:
        """Row order of a forward: sequences held, by slot, then new ones as given (they get the next
        slots). Rows of a step over running sequences then usually sit in consecutive slots, and the
        cache is read through views."""
        held = sorted((self.cache.slot(key), i) for i, key in enumerate(keys) if key in self.cache)
        return [i for _, i in held] + [i for i, key in enumerate(keys) if key not in self.cache]

    def _run(self, keys: list[Hashable], counts: list[int], rows: list[Tensor] | Tensor) -> Tensor:
        """One forward appending ``rows[i]``, ``counts[i]`` token ids (a 1-D chunk each, or for a decode
        one ``[n, 1]`` tensor), to sequence ``keys[i]``; logits at each row's last token, in the given
        order."""
        cache, model, dev = self.cache, self.model, self.device
        order = self._slot_order(keys)
        counts = [counts[i] for i in order]
        step = cache.extend([(keys[i], n) for i, n in zip(order, counts)])
        n, t = step.shape
        reordered = order != list(range(n))
        if isinstance(rows, Tensor):  # decode: one token per row
            ids = rows[torch.tensor(order, device=rows.device)] if reordered else rows
        else:
            ids = torch.zeros(n, t, dtype=torch.long, device=rows[0].device)
            for row, i in enumerate(order):
                ids[row, :counts[row]] = rows[i]
        h = model.hidden_states(ids.to(dev, non_blocking=True), step)
        if t == 1:
            h = h[:, 0]
        else:
            h = h[torch.arange(n, device=dev), torch.tensor(counts, device=dev) - 1]
        logits = model.logits(h)
        if reordered:  # back to the caller's order
            logits = logits[torch.argsort(torch.tensor(order, device=dev))]
        return logits


class _LossRunner:
    """What full and LoRA training share: a loss through ``self.trained`` (the module whose parameters
    ``self.optimizer`` updates), its backward, the AdamW step."""

    trained: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def forward(self, ids: Tensor, targets: Tensor | None = None) -> Tensor:
        """Cross-entropy loss of ``ids`` ``[mb, seq]``, autograd recording; ``targets`` default to
        ``default_targets(ids)``."""
        return next_token_loss(self.trained(ids), default_targets(ids) if targets is None else targets)

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of ``loss`` into the trained parameters."""
        loss.backward()

    def forward_backward(self, ids: Tensor, targets: Tensor | None = None) -> float:
        """One micro-batch: forward and backward, gradients accumulated."""
        loss = self.forward(ids, targets)
        self.backward(loss)
        return loss.item()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class TrainingRunner(_LossRunner):
    """Full-parameter training of one whole replica on one device, in the three phases
    ``calibrate/measure_train.py`` times: forward (with the float32 loss), backward, AdamW step."""

    def __init__(self, model: Llama, lr: float = 1e-5):
        _check_whole_model(model, "TrainingRunner")
        self.model = self.trained = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

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


class LoraTrainingRunner(_LossRunner):
    """LoRA fine-tuning (adapters on ``targets``, default q_proj and v_proj) on top of ``model``, the
    very module a ``ServingRunner`` may be serving.

    The adapters live in a second module tree over the same weight tensors (``weight_sharing_copy``),
    so ``model`` itself never sees them: serving computes bit for bit what it did before, during and
    after fine-tuning. The base weights are frozen (``requires_grad`` off, shared with ``model``); only
    the adapters train, with AdamW. ``generator`` seeds the adapters' init (default: the global RNG).
    """

    def __init__(self, model: Llama, rank: int, alpha: float, lr: float = 1e-4,
                 targets: Sequence[str] = ("q_proj", "v_proj"), *, generator: torch.Generator | None = None):
        _check_whole_model(model, "LoraTrainingRunner")
        self.model = model
        self.adapted = weight_sharing_copy(model)
        self.adapter_params = apply_lora(self.adapted, rank, alpha, targets, generator=generator)
        self.optimizer = torch.optim.AdamW(self.adapter_params, lr=lr)
        self.trained = self.adapted


class StageTrainingRunner:
    """Full-parameter training of one pipeline stage: ``model`` built with ``layers=stage_layers(spec, S,
    s)``, the embedding on the first stage only (``embed=s == 0``), the head on the last only.

    ``forward`` of a micro-batch keeps its autograd graph until the matching ``backward``; several
    micro-batches may be in flight (GPipe, 1F1B), and ``backward`` takes them first in, first out.
    """

    def __init__(self, model: Llama, lr: float = 1e-5):
        self.model = model
        self.first, self.last = model.embed_tokens is not None, model.lm_head is not None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self._in_flight: deque[tuple[Tensor | None, Tensor]] = deque()

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """``x``: token ids ``[mb, seq]`` on the first stage, else the previous stage's output. Returns
        the activations to send on ``[mb, seq, hidden]`` (detached), or on the last stage the loss against
        ``targets`` (required there; detached: ``backward`` runs from the kept one)."""
        if self.last and targets is None:
            raise ValueError("the last pipeline stage computes the loss: forward needs targets")
        inp = None if self.first else x.detach().requires_grad_(True)
        out = self.model(x if self.first else inp)
        if self.last:
            out = next_token_loss(out, targets)
        self._in_flight.append((inp, out))
        return out.detach()

    def backward(self, grad_output: Tensor | None = None) -> Tensor | None:
        """Back-propagate the oldest micro-batch in flight from ``grad_output`` (the next stage's
        gradient of this stage's output; none on the last stage, which starts from its loss).
        Returns the gradient of this stage's input, for the previous stage (None on the first)."""
        if not self._in_flight:
            raise ValueError("backward without a micro-batch in flight")
        inp, out = self._in_flight.popleft()
        if self.last:
            out.backward()
        else:
            if grad_output is None:
                raise ValueError("a pipeline stage before the last needs the gradient of its output")
            out.backward(grad_output)
        return None if inp is None else inp.grad

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
