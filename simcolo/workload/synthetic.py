"""Synthetic workloads: Poisson or Gamma arrivals with fixed or empirical lengths.

Requests are generated lazily, ``CHUNK`` at a time, so a workload of ten million requests (or an
unbounded one) holds one chunk in memory. The first request arrives at 0 s; each following one a
random inter-arrival gap later. All randomness comes from the ``numpy.random.Generator`` passed in,
drawn in a fixed order (gaps, then lengths, chunk by chunk), so a seed fixes the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import pandas as pd

from simcolo.workload.loaders import make_chunk, read_lengths

CHUNK = 65536


class Arrivals(Protocol):
    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


class Lengths(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class PoissonArrivals:
    """Exponential inter-arrival gaps with mean 1/rate."""

    rate_rps: float

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0 / self.rate_rps, n)

    def __str__(self) -> str:
        return f"poisson {self.rate_rps:g} req/s"


@dataclass(frozen=True)
class GammaArrivals:
    """Gamma inter-arrival gaps with mean 1/rate and coefficient of variation ``cv``.

    shape k = 1/cv², scale = 1/(rate·k): the mean is k·scale = 1/rate and the CV is 1/sqrt(k).
    cv = 1 is Poisson; cv > 1 is burstier, cv < 1 more regular.
    """

    rate_rps: float
    cv: float

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / (self.rate_rps * shape), n)

    def __str__(self) -> str:
        return f"gamma {self.rate_rps:g} req/s cv {self.cv:g}"


@dataclass(frozen=True)
class FixedLengths:
    prompt_tokens: int
    output_tokens: int

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt_tokens, np.int64), np.full(n, self.output_tokens, np.int64)

    def __str__(self) -> str:
        return f"lengths fixed {self.prompt_tokens}/{self.output_tokens}"


class EmpiricalLengths:
    """(prompt, output) pairs drawn jointly, with replacement, from a trace.

    Drawing pairs rather than the two marginals keeps the trace's prompt/output correlation.
    """

    def __init__(self, prompt: np.ndarray, output: np.ndarray, source: str):
        self.prompt, self.output, self.source = prompt, output, source

    @classmethod
    def from_trace(cls, path, fmt: str, source: str) -> "EmpiricalLengths":
        prompt, output = read_lengths(path, fmt)
        return cls(prompt, output, source)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.prompt), n)
        return self.prompt[idx], self.output[idx]

    def __str__(self) -> str:
        return f"lengths empirical from {self.source} ({len(self.prompt)} pairs)"


def synthetic_chunks(
    arrivals: Arrivals,
    lengths: Lengths,
    rng: np.random.Generator,
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    chunk: int = CHUNK,
) -> Iterator[pd.DataFrame]:
    """Yield chunks like the trace loaders do, until ``num_requests`` or ``duration_s`` (if either is set).

    ``duration_s`` keeps arrivals in [0, duration_s). The ``line`` column is the 1-based request number.
    """
    start = 0.0
    made = 0
    while num_requests is None or made < num_requests:
        n = chunk if num_requests is None else min(chunk, num_requests - made)
        gaps = arrivals.gaps(rng, n)
        ends = start + np.cumsum(gaps)
        times = np.concatenate(([start], ends[:-1]))
        start = float(ends[-1])
        prompt, output = lengths.sample(rng, n)
        lines = np.arange(made + 1, made + n + 1, dtype=np.int64)
        if duration_s is not None and times[-1] >= duration_s:
            cut = int(np.searchsorted(times, duration_s, "left"))
            yield make_chunk(times[:cut], prompt[:cut], output[:cut], lines[:cut])
            return
        yield make_chunk(times, prompt, output, lines)
        made += n
