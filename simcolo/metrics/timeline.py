"""GPU and instance state sampled at a fixed simulated interval (memory, queues, busy time).

Sampling only reads state (views are pure queries), so it never changes a run's results.
"""
from __future__ import annotations

from array import array

import pandas as pd

from simcolo.errors import ConfigError
from simcolo.hardware.environment import At


class GpuTimeline:
    """The ``gpus.parquet`` table both backends write: one row per GPU per sample."""

    COLUMNS = ("time_s", "gpu", "instance", "waiting", "running", "kv_blocks_used",
               "kv_used_bytes", "memory_used_bytes", "memory_capacity_bytes", "busy_s", "utilization",
               "train_memory_bytes")

    def __init__(self):
        self._cols = {c: array("d") for c in self.COLUMNS}
        self._last_busy: dict[int, float] = {}

    def append(self, now: float, rows, gpus, dt: float, memory_used=None) -> None:
        """``rows``: (gpu, instance or -1, waiting, running, KV blocks used, KV bytes used, busy seconds so
        far); ``gpus``: the cluster's; ``dt``: time since the previous sample (utilization over it, 0: none);
        ``memory_used(gpu, accounted_bytes)``: what to report as memory in use (default: the accounting --
        weights, training state, KV blocks in use, not the preallocated cache)."""
        cols = self._cols
        for g, inst_index, waiting, running, used_blocks, kv_bytes, busy in rows:
            mem = gpus[g].memory
            train = mem.by_use.get("train_state", 0.0) + mem.by_use.get("train_activations", 0.0) \
                + mem.by_use.get("lora_state", 0.0)
            used = mem.used - mem.by_use.get("kv_cache", 0.0) + kv_bytes
            if memory_used is not None:
                used = memory_used(g, used)
            last = self._last_busy.get(g, 0.0)
            util = (busy - last) / dt if dt > 0 else 0.0
            self._last_busy[g] = busy
            for key, value in (("time_s", now), ("gpu", g), ("instance", inst_index), ("waiting", waiting),
                               ("running", running), ("kv_blocks_used", used_blocks), ("kv_used_bytes", kv_bytes),
                               ("memory_used_bytes", used), ("memory_capacity_bytes", mem.capacity),
                               ("busy_s", busy), ("utilization", min(1.0, max(0.0, util))),
                               ("train_memory_bytes", train)):
                cols[key].append(value)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame({c: pd.Series(self._cols[c], dtype="float64") for c in self.COLUMNS})
        for c in ("gpu", "instance", "waiting", "running", "kv_blocks_used"):
            df[c] = df[c].astype("int64")
        return df


def instance_rows(system, now: float, busy_of) -> list[tuple]:
    """One row per serving GPU: its instance's queues and KV blocks in use, and ``busy_of(gpu, instance)``."""
    block_bytes = system.kv_budget.block_bytes
    rows = []
    for inst in system.instances:
        used_blocks = inst.kv_blocks_used(now)
        for g in inst.gpus:
            rows.append((g, inst.index, len(inst.waiting), len(inst.running) + len(inst.prefilling),
                         used_blocks, used_blocks * block_bytes, busy_of(g, inst)))
    return rows


class TimelineSampler:
    """Samples the simulation every ``interval_s`` simulated seconds (a SimPy event chain)."""

    COLUMNS = GpuTimeline.COLUMNS

    def __init__(self, env, system, interval_s: float, is_done, on_tick=None):
        if interval_s <= 0:
            raise ConfigError(f"metrics.timeline_interval_s must be > 0, got {interval_s}")
        self.env, self.system, self.interval_s, self.is_done = env, system, interval_s, is_done
        self.on_tick = on_tick   # called with the simulated time after each sample (progress bars)
        self.table = GpuTimeline()
        self._tick = 0
        self._schedule()

    def _schedule(self) -> None:
        ev = At(self.env, self._tick * self.interval_s)
        ev.callbacks.append(self._sample)

    def _sample(self, _ev) -> None:
        """One row per GPU: serving GPUs with their instance's queues and KV, training-only GPUs
        (isolated layouts) with instance -1. ``utilization`` is the busy fraction since the previous sample."""
        now = self.env.now
        if self.system.settle_training is not None:
            self.system.settle_training()
        gpus = self.system.cluster.gpus
        rows = instance_rows(self.system, now,
                             lambda g, inst: gpus[g].compute.busy_at(now) if inst.attached else inst.busy_s)
        seen = {row[0] for row in rows}
        for gpu in gpus:
            if gpu.index not in seen and (gpu.compute.busy_s + len(gpu.compute.running) > 0
                                          or gpu.compute.offline is not None):
                rows.append((gpu.index, -1, 0, 0, 0, 0.0, gpu.compute.busy_at(now)))
        self.table.append(now, rows, gpus, self.interval_s if self._tick else 0.0)
        self._tick += 1
        if self.on_tick is not None:
            self.on_tick(now)
        if not self.is_done():
            self._schedule()

    def frame(self) -> pd.DataFrame:
        return self.table.frame()
