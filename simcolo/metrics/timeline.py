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
               "kv_used_bytes", "memory_used_bytes", "memory_capacity_bytes", "busy_s")

    def __init__(self, env, system, interval_s: float, is_done, on_tick=None):
        if interval_s <= 0:
            raise ConfigError(f"metrics.timeline_interval_s must be > 0, got {interval_s}")
        self.env, self.system, self.interval_s, self.is_done = env, system, interval_s, is_done
        self.on_tick = on_tick   # called with the simulated time after each sample (progress bars)
        self._cols = {c: array("d") for c in self.COLUMNS}
        self._tick = 0
        self._schedule()

    def _schedule(self) -> None:
        ev = At(self.env, self._tick * self.interval_s)
        ev.callbacks.append(self._sample)

    def _sample(self, _ev) -> None:
        now = self.env.now
        budget = self.system.kv_budget
        cols = self._cols
        for inst in self.system.instances:
            used_blocks = inst.kv_blocks_used(now)
            kv_bytes = used_blocks * budget.block_bytes
            for g in inst.gpus:
                mem = self.system.cluster.gpus[g].memory
                for key, value in (("time_s", now), ("gpu", g), ("instance", inst.index),
                                   ("waiting", len(inst.waiting)),
                                   ("running", len(inst.running) + len(inst.prefilling)),
                                   ("kv_blocks_used", used_blocks), ("kv_used_bytes", kv_bytes),
                                   ("memory_used_bytes", budget.weights_bytes + budget.activations_bytes + kv_bytes),
                                   ("memory_capacity_bytes", mem.capacity), ("busy_s", inst.busy_s)):
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
