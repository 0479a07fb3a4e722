"""Timing one call: CUDA events on a GPU, ``torch.utils.benchmark`` on the CPU.

Every measurement in calibrate/ goes through :class:`CallTimer`, so they all follow the same rules:

* ``warmup`` untimed calls first (allocator, autotuning, caches);
* then ``repeats`` timed samples; the table keeps their **median** (``latency_s``), their standard
  deviation (``latency_std_s``) and their number (``repeats``);
* a ``setup`` callable, if given, runs before every timed call and is not timed (a backward pass
  needs a fresh forward each time);
* on CUDA each sample is one call between two CUDA events on the current stream, and the peak of
  ``torch.cuda.max_memory_allocated`` over the timed calls is kept; on the CPU a sample is the mean of
  a block of calls long enough (``cpu_min_block_s``) for the timer's resolution and the OS's noise not
  to matter, timed by ``torch.utils.benchmark.Timer`` (with a ``setup``: one call per sample, timed
  with ``time.perf_counter``), and no allocator statistics exist.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    median_s: float
    std_s: float
    repeats: int
    peak_memory_bytes: int | None  # CUDA allocator peak over the timed calls; None on the CPU


class CallTimer:
    def __init__(self, device: str, repeats: int, warmup: int, cpu_min_block_s: float = 0.01):
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
        self.device = torch.device(device)
        self.repeats, self.warmup, self.cpu_min_block_s = repeats, warmup, cpu_min_block_s

    def __call__(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> Timing:
        for _ in range(self.warmup):
            if setup is not None:
                setup()
            fn()
        if self.device.type == "cuda":
            return self._cuda(fn, setup)
        return self._cpu(fn, setup)

    # ---------------------------------------------------------------------------------------- CPU

    def _cpu(self, fn, setup) -> Timing:
        if setup is not None:
            # torch's Timer runs its own untimed calls of ``stmt`` before each block, which a call that
            # consumes its setup (a backward pass) cannot repeat: time single calls directly.
            samples = []
            for _ in range(self.repeats):
                setup()
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return _summary(samples, None)
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        one = timer.timeit(1).mean
        number = max(1, math.ceil(self.cpu_min_block_s / max(one, 1e-9)))
        samples = [timer.timeit(number).mean for _ in range(self.repeats)]
        return _summary(samples, None)

    # ---------------------------------------------------------------------------------------- CUDA

    def _cuda(self, fn, setup) -> Timing:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        pairs = []
        for _ in range(self.repeats):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(self.device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in pairs]
        return _summary(samples, int(torch.cuda.max_memory_allocated(self.device)))


def _summary(samples: list[float], peak: int | None) -> Timing:
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return Timing(float(statistics.median(samples)), float(std), len(samples), peak)
