"""GPU and instance state sampled every ``metrics.timeline_interval_s`` of a replay, in the simulator's
``gpus.parquet`` table (``simcolo.metrics.timeline.GpuTimeline``)."""
from __future__ import annotations

import pandas as pd
import torch

from simcolo.errors import ConfigError
from simcolo.metrics.timeline import GpuTimeline, instance_rows


class LiveTimeline:
    COLUMNS = GpuTimeline.COLUMNS

    def __init__(self, backend, interval_s: float):
        if interval_s <= 0:
            raise ConfigError(f"metrics.timeline_interval_s must be > 0, got {interval_s}")
        self.backend, self.interval_s = backend, interval_s
        self.next_s = 0.0
        self.table = GpuTimeline()
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
        train_busy: dict[int, float] = {}
        for t in b.trainers:
            for g, busy in t.busy_by_gpu().items():
                train_busy[g] = train_busy.get(g, 0.0) + busy
        rows = instance_rows(b.system, now, lambda g, inst: inst.busy_s + train_busy.pop(g, 0.0))
        rows += [(g, -1, 0, 0, 0, 0.0, busy) for g, busy in train_busy.items()]

        def memory_used(g: int, accounted: float) -> float:
            dev = b.device_of(g)
            return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else accounted

        self.table.append(now, rows, b.cluster.gpus, now - self._last_s, memory_used)
        self._last_s = now

    def frame(self) -> pd.DataFrame:
        return self.table.frame()
