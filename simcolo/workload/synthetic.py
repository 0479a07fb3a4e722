"""Synthetic workloads: Poisson, Gamma or diurnal (sinusoidal-rate) arrivals with fixed, empirical or
log-normal lengths.

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
class DiurnalArrivals:
    """A Poisson process whose rate follows a day: ``rate(t) = rate_rps * (1 - amplitude * cos(2 pi t / period_s))``,
    lowest at t = 0, highest half a period later, ``rate_rps`` on average over a period.

    Drawn by time rescaling: unit-rate exponential gaps (``gaps``) on the process's *operational* time
    u = Lambda(t) = rate_rps * (t - amplitude * period_s / (2 pi) * sin(2 pi t / period_s)), mapped back to
    real time by ``warp`` (Lambda is increasing for amplitude < 1; it is inverted by bisection, which is exact
    to 1e-9 s and vectorised).
    """

    rate_rps: float
    amplitude: float
    period_s: float

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0, n)

    def cumulative(self, t: np.ndarray) -> np.ndarray:
        w = 2.0 * np.pi / self.period_s
        return self.rate_rps * (t - self.amplitude / w * np.sin(w * t))

    def warp(self, u: np.ndarray) -> np.ndarray:
        """Real arrival times of operational times ``u`` (the inverse of :meth:`cumulative`)."""
        slack = self.amplitude * self.period_s / (2.0 * np.pi)
        lo = np.maximum(u / self.rate_rps - slack, 0.0)
        hi = u / self.rate_rps + slack
        while float(np.max(hi - lo, initial=0.0)) > 1e-9:
            mid = 0.5 * (lo + hi)
            below = self.cumulative(mid) < u
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __str__(self) -> str:
        return f"diurnal {self.rate_rps:g} req/s x (1 - {self.amplitude:g} cos), period {self.period_s:g} s"


@dataclass(frozen=True)
class LogNormalLengths:
    """Prompt and output lengths drawn independently from log-normal distributions (``median`` and
    ``sigma`` of the log), rounded and clipped to [1, ``max_prompt_tokens``] / [1, ``max_output_tokens``]:
    a long tail of prompts (retrieval, documents, agents' histories) up to a context limit."""

    prompt_median: float
    prompt_sigma: float
    output_median: float
    output_sigma: float
    max_prompt_tokens: int
    max_output_tokens: int

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompt = rng.lognormal(np.log(self.prompt_median), self.prompt_sigma, n)
        output = rng.lognormal(np.log(self.output_median), self.output_sigma, n)
        return (np.clip(np.rint(prompt), 1, self.max_prompt_tokens).astype(np.int64),
                np.clip(np.rint(output), 1, self.max_output_tokens).astype(np.int64))

    def __str__(self) -> str:
        return (f"lengths log-normal prompt median {self.prompt_median:g} sigma {self.prompt_sigma:g} "
                f"(<= {self.max_prompt_tokens}), output median {self.output_median:g} sigma {self.output_sigma:g}")


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
    Arrivals with a ``warp`` (diurnal) draw their gaps on an operational time axis that ``warp`` maps to
    real time.
    """
    warp = getattr(arrivals, "warp", None)
    start = 0.0
    made = 0
    while num_requests is None or made < num_requests:
        n = chunk if num_requests is None else min(chunk, num_requests - made)
        gaps = arrivals.gaps(rng, n)
        ends = start + np.cumsum(gaps)
        times = np.concatenate(([start], ends[:-1]))
        start = float(ends[-1])
        if warp is not None:
            times = warp(times)
        prompt, output = lengths.sample(rng, n)
        lines = np.arange(made + 1, made + n + 1, dtype=np.int64)
        if duration_s is not None and times[-1] >= duration_s:
            cut = int(np.searchsorted(times, duration_s, "left"))
            yield make_chunk(times[:cut], prompt[:cut], output[:cut], lines[:cut])
            return
        yield make_chunk(times, prompt, output, lines)
        made += n
