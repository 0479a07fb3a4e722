"""The KV cache of a serving instance: sequences of different lengths in one preallocated tensor.

``KVCache`` holds K/V ``[num_layers, max_seqs, num_kv_heads, max_len, head_dim]``: one contiguous slot
per sequence, named by a hashable key (a request id), each with its own length. ``extend`` makes the
attention step of one forward that appends new tokens to some of the sequences (a prefill of new
prompts, a chunk continuing a prompt, a decode step: all the same to the cache), as an ``Attend`` for
``Llama.forward``. ``export``/``import_sequence`` move a sequence's K/V to another cache, as
prefill/decode disaggregation moves it between instances.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor

from simcolo.engine.model import attention
from simcolo.specs import ModelSpec


class KVCache:
    """Preallocated K/V for up to ``max_seqs`` sequences of up to ``max_len`` tokens, over
    ``num_layers`` layers (default: the whole model's; a pipeline stage's cache holds only its layers).

    Occupied slots are kept contiguous at ``0..n-1`` (``release`` moves the last one into the hole), so
    a step over all running sequences reads plain views ``k[layer, :n, :, :S]``, without a gather.
    ``lengths`` (tokens held, per occupied slot in slot order) is public: timing loops reset it to
    replay one step. The cache is zero-filled: positions beyond a slot's length are masked in attention,
    but masking only zeroes their weights, and 0 * NaN from uninitialised memory would still be NaN.
    """

    def __init__(self, spec: ModelSpec, max_seqs: int, max_len: int, num_layers: int | None = None, *,
                 device, dtype):
        if max_seqs < 1 or max_len < 1:
            raise ValueError(f"KVCache needs max_seqs >= 1 and max_len >= 1, got {max_seqs}, {max_len}")
        shape = (spec.num_layers if num_layers is None else num_layers, max_seqs, spec.num_kv_heads, max_len,
                 spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths: list[int] = []  # per occupied slot, in slot order
        self._keys: list[Hashable] = []  # slot -> key
        self._slot: dict[Hashable, int] = {}  # key -> slot

    @classmethod
    @torch.no_grad()
    def filled(cls, spec: ModelSpec, lengths: Sequence[int], max_len: int, num_layers: int | None = None, *,
               device, dtype, max_seqs: int | None = None, generator: torch.Generator | None = None) -> "KVCache":
        """A cache holding sequences ``0..n-1`` of ``lengths[i]`` tokens of random K/V (standard normal,
        drawn over ``[:n, :max(lengths)]``, K first): for timing a decode step at given KV lengths without
        running a prefill first."""
        if not lengths:
            raise ValueError("KVCache.filled: no sequences")
        cache = cls(spec, len(lengths) if max_seqs is None else max_seqs, max_len, num_layers,
                    device=device, dtype=dtype)
        for key, n in enumerate(lengths):
            cache.allocate(key, n)
        n, longest = len(lengths), max(lengths)
        cache.k[:, :n, :, :longest].normal_(generator=generator)
        cache.v[:, :n, :, :longest].normal_(generator=generator)
        return cache

    # --- shape -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def max_seqs(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    # --- bookkeeping -------------------------------------------------------------------------------
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

    def allocate(self, key: Hashable, length: int = 0) -> int:
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

    @torch.no_grad()
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

    # --- moving a sequence between caches ------------------------------------------------------------
    @torch.no_grad()
    def export(self, key: Hashable) -> tuple[Tensor, Tensor]:
        """Copies of ``key``'s K and V, all layers: ``[num_layers, num_kv_heads, length, head_dim]`` each,
        on this cache's device (the slot may be reused or moved once released)."""
        slot, n = self.slot(key), self.length(key)
        return self.k[:, slot, :, :n].clone(), self.v[:, slot, :, :n].clone()

    @torch.no_grad()
    def import_sequence(self, key: Hashable, k: Tensor, v: Tensor) -> None:
        """Give ``key`` a slot holding K/V exported from another cache (any device, any dtype: converted
        on the copy, asynchronous when this cache is on a GPU)."""
        want = (self.num_layers, self.k.shape[2], self.k.shape[4])
        if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != want:
            raise ValueError(f"import of sequence {key!r}: K {tuple(k.shape)} / V {tuple(v.shape)} do not fit a "
                             f"cache of {want[0]} layers x {want[1]} KV heads x head_dim {want[2]}")
        n = k.shape[2]
        slot = self.allocate(key, n)
        non_blocking = self.k.is_cuda  # into device memory: the stream orders it before any use
        self.k[:, slot, :, :n].copy_(k, non_blocking=non_blocking)
        self.v[:, slot, :, :n].copy_(v, non_blocking=non_blocking)

    # --- one forward's attention ---------------------------------------------------------------------
    def extend(self, rows: Sequence[tuple[Hashable, int]]) -> "CachedAttention":
        """The attention step of one forward that appends ``n`` new tokens to sequence ``key`` for each
        row ``(key, n)``, in that row order (a key not held yet gets the next free slot).

        The model's input is then ``[len(rows), max n]``, each row right-padded. Everything is checked
        before anything changes; the lengths advance here, for the forward that follows writes the K/V.
        """
        if not rows:
            raise ValueError("a forward of no sequences")
        keys = [key for key, _ in rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys in one batch: {keys}")
        new = [key for key in keys if key not in self]
        if self.num_active + len(new) > self.max_seqs:
            raise ValueError(f"no free slot: {self.num_active} running + {len(new)} new sequences > "
                             f"max_seqs {self.max_seqs}")
        starts = [self.length(key) if key in self else 0 for key in keys]
        for (key, n), start in zip(rows, starts):
            if n < 1:
                raise ValueError(f"sequence {key!r}: no new tokens")
            if start + n > self.max_len:
                raise ValueError(f"sequence {key!r}: KV cache overflow: {start} cached + {n} new = {start + n} "
                                 f"tokens > max_len={self.max_len}")
        for key in new:
            self.allocate(key)
        slots = [self.slot(key) for key in keys]
        counts = [n for _, n in rows]
        for slot, n in zip(slots, counts):
            self.lengths[slot] += n
        return CachedAttention(self, slots, starts, counts)


class CachedAttention:
    """One forward's attention over a ``KVCache`` (an ``Attend``): row ``r`` brings ``counts[r]`` new
    tokens to the sequence in slot ``slots[r]``, which already holds ``starts[r]``.

    Each layer writes the new K/V into the slots and attends over each row's prefix plus its own new
    tokens, causally. Three cases, cheapest first:

    * *fresh*: new sequences in consecutive slots (a prefill of whole prompts): each layer's K/V land
      with one slice copy, padding included (positions past a slot's length are masked later and
      overwritten as it grows), and the prompts attend among themselves (``is_causal``), no cache read;
    * rows in consecutive slots, in slot order: the cache is read through views;
    * otherwise each layer's K/V prefixes are gathered.

    Outside *fresh*, only real tokens are written, and a mask hides each row's padding and positions
    beyond its own; a decode step whose rows all sit at one position needs no mask at all.
    """

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], counts: list[int]):
        dev = cache.device
        b, t = len(slots), max(counts)
        self.cache = cache
        self.num_layers = cache.num_layers
        self.shape = (b, t)
        self._lo = slots[0]
        self._consecutive = slots == list(range(self._lo, self._lo + b))
        self._fresh = self._consecutive and not any(starts)
        ends = [s + n for s, n in zip(starts, counts)]
        one_start = len(set(starts)) == 1
        needs_mask = not self._fresh and not (t == 1 and one_start)
        # position of each new token [B, T], built on the host and copied to the device once; a padding
        # position may run past max_len: clamped, as its outputs are never used
        at = torch.tensor(starts)[:, None] + torch.arange(t)
        at_dev = at.clamp(max=cache.max_len - 1).to(dev, non_blocking=True) if needs_mask or not one_start else None
        self.positions: int | Tensor = starts[0] if one_start else at_dev
        if self._fresh:
            return
        self._span = max(ends)  # key positions any row reads
        rows, cols = (torch.arange(t) < torch.tensor(counts)[:, None]).nonzero(as_tuple=True)  # real tokens
        write = torch.stack([torch.tensor(slots)[rows], at[rows, cols], rows, cols]).to(dev, non_blocking=True)
        self._write_slots, self._write_pos, self._rows, self._cols = write
        self._read_slots = None if self._consecutive else torch.tensor(slots).to(dev, non_blocking=True)
        self._mask = (torch.arange(self._span, device=dev) <= at_dev[:, :, None])[:, None] \
            if needs_mask else None  # [B, 1 (heads), T, S]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        if self._fresh:
            b, t = self.shape
            ck[self._lo:self._lo + b, :, :t] = k
            cv[self._lo:self._lo + b, :, :t] = v
            return attention(q, k, v)
        ck[self._write_slots, :, self._write_pos] = k.transpose(1, 2)[self._rows, self._cols]
        cv[self._write_slots, :, self._write_pos] = v.transpose(1, 2)[self._rows, self._cols]
        if self._read_slots is None:
            b = self.shape[0]
            keys, values = ck[self._lo:self._lo + b, :, :self._span], cv[self._lo:self._lo + b, :, :self._span]
        else:
            keys, values = ck[self._read_slots, :, :self._span], cv[self._read_slots, :, :self._span]
        return attention(q, keys, values, self._mask)
