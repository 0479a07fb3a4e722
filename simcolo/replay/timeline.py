"""GPU and instance state sampled every ``metrics.timeline_interval_s`` of a replay, in the columns of
the simulator's ``gpus.parquet`` (``simcolo.metrics.timeline.TimelineSampler``)."""
from __future__ import annotations

from array import array

import pandas as pd
import torch

from simcolo.errors import ConfigError
from simcolo.metrics.timeline import TimelineSampler


class LiveTimeline:
    COLUMNS = TimelineSampler.COLUMNS

    def __init__(self, backend, interval_s: float):
        if interval_s <= 0:
            raise ConfigError(f"metrics.timeline_interval_s must be > 0, got {interval_s}")
        self.backend, self.interval_s = backend, interval_s
        self.next_s = 0.0
        self._cols = {c: array("d") for c in self.COLUMNS}
        self._last_busy: dict[int, float] = {}
        self._last_s = 0.0

    def sample_due(self, now: float) -> None:
        if now >= self.next_s:
            self.sample(now)
            while self.next_s <= now:
                self.next_s += self.interval_s

    def sample(self, now: float) -> None:
        """One row per GPU (call under the replay's lock). ``memory_used_bytes`` is the accounting the
        simulator keeps (weights, training state, KV blocks in use), or on CUDA what torch's allocator
        holds on that device; ``busy_s`` counts serving iterations and training kernels."""
        b = self.backend
        cols = self._cols
        block_bytes = b.system.kv_budget.block_bytes
        train_busy: dict[int, float] = {}
        for t in b.trainers:
            for g, busy in t.busy_by_gpu().items():
                train_busy[g] = train_busy.get(g, 0.0) + busy
        rows = []
        for inst in b.system.instances:
            used = inst.kv_blocks_used(now)
            for g in inst.gpus:
                rows.append((g, inst.index, len(inst.waiting), len(inst.running) + len(inst.prefilling), used,
                             used * block_bytes, inst.busy_s + train_busy.pop(g, 0.0)))
        for g, busy in train_busy.items():
            rows.append((g, -1, 0, 0, 0, 0.0, busy))
        dt = now - self._last_s
        for g, index, waiting, running, used, kv_bytes, busy in rows:
            mem = b.cluster.gpus[g].memory
            dev = b.device_of(g)
            static = mem.used - mem.by_use.get("kv_cache", 0.0)
            used_bytes = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else static + kv_bytes
            train = mem.by_use.get("train_state", 0.0) + mem.by_use.get("train_activations", 0.0) \
                + mem.by_use.get("lora_state", 0.0)
            util = (busy - self._last_busy.get(g, 0.0)) / dt if dt > 0 else 0.0
            self._last_busy[g] = busy
            for key, value in (("time_s", now), ("gpu", g), ("instance", index), ("waiting", waiting),
                               ("running", running), ("kv_blocks_used", used), ("kv_used_bytes", kv_bytes),
                               ("memory_used_bytes", used_bytes), ("memory_capacity_bytes", mem.capacity),
                               ("busy_s", busy), ("utilization", min(1.0, max(0.0, util))),
                               ("train_memory_bytes", train)):
                cols[key].append(value)
        self._last_s = now

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame({c: pd.Series(self._cols[c], dtype="float64") for c in self.COLUMNS})
        for c in ("gpu", "instance", "waiting", "running", "kv_blocks_used"):
            df[c] = df[c].astype("int64")
        return df
