"""GPU and instance state sampled at a fixed simulated interval (memory, queues, busy time).

Sampling only reads state (views are pure queries), so it never changes a run's results.
"""
from __future__ import annotations

from array import array

import pandas as pd

from simcolo.errors import ConfigError
from simcolo.hardware.environment import At


class TimelineSampler:
    COLUMNS = ("time_s", "gpu", "instance", "waiting", "running", "kv_blocks_used",
               "kv_used_bytes", "memory_used_bytes", "memory_capacity_bytes", "busy_s", "utilization",
               "train_memory_bytes")

    def __init__(self, env, system, interval_s: float, is_done, on_tick=None):
        if interval_s <= 0:
            raise ConfigError(f"metrics.timeline_interval_s must be > 0, got {interval_s}")
        self.env, self.system, self.interval_s, self.is_done = env, system, interval_s, is_done
        self.on_tick = on_tick   # called with the simulated time after each sample (progress bars)
        self._cols = {c: array("d") for c in self.COLUMNS}
        self._tick = 0
        self._last_busy: dict[int, float] = {}
        self._schedule()

    def _schedule(self) -> None:
        ev = At(self.env, self._tick * self.interval_s)
        ev.callbacks.append(self._sample)

    def _sample(self, _ev) -> None:
        """One row per GPU: serving GPUs with their instance's queues and KV, training-only GPUs
        (isolated layouts) with instance -1. ``memory_used_bytes`` counts KV blocks in use, not the
        preallocated cache; ``utilization`` is the busy fraction since the previous sample."""
        now = self.env.now
        budget = self.system.kv_budget
        cols = self._cols
        gpus = self.system.cluster.gpus
        seen = set()
        rows = []
        for inst in self.system.instances:
            used_blocks = inst.kv_blocks_used(now)
            kv_bytes = used_blocks * budget.block_bytes
            for g in inst.gpus:
                seen.add(g)
                busy = gpus[g].compute.busy_at(now) if inst.attached else inst.busy_s
                rows.append((g, inst.index, len(inst.waiting), len(inst.running) + len(inst.prefilling),
                             used_blocks, kv_bytes, busy))
        for gpu in gpus:
            if gpu.index not in seen and gpu.compute.busy_s + len(gpu.compute.running) > 0:
                rows.append((gpu.index, -1, 0, 0, 0, 0.0, gpu.compute.busy_at(now)))
        for g, inst_index, waiting, running, used_blocks, kv_bytes, busy in rows:
            mem = gpus[g].memory
            train = mem.by_use.get("train_state", 0.0) + mem.by_use.get("train_activations", 0.0) \
                + mem.by_use.get("lora_state", 0.0)
            static = mem.used - mem.by_use.get("kv_cache", 0.0)
            last = self._last_busy.get(g, 0.0)
            util = (busy - last) / self.interval_s if self._tick else 0.0
            self._last_busy[g] = busy
            for key, value in (("time_s", now), ("gpu", g), ("instance", inst_index), ("waiting", waiting),
                               ("running", running), ("kv_blocks_used", used_blocks), ("kv_used_bytes", kv_bytes),
                               ("memory_used_bytes", static + kv_bytes), ("memory_capacity_bytes", mem.capacity),
                               ("busy_s", busy), ("utilization", min(1.0, max(0.0, util))),
                               ("train_memory_bytes", train)):
                cols[key].append(value)
        self._tick += 1
        if self.on_tick is not None:
            self.on_tick(now)
        if not self.is_done():
            self._schedule()

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame({c: pd.Series(self._cols[c], dtype="float64") for c in self.COLUMNS})
        for c in ("gpu", "instance", "waiting", "running", "kv_blocks_used"):
            df[c] = df[c].astype("int64")
        return df
