"""How fast co-running kernels progress on one GPU.

A kernel's *rate* is the fraction of its solo speed it gets while others run beside it. The
identity model (every kernel at full speed) is the default until measured interference tables
exist; a table-driven model implements the same ``rates`` method.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class InterferenceModel(Protocol):
    def rates(self, kinds: Sequence[str]) -> list[float]:
        """Progress rate (0, 1] of each running kernel, given the kinds of all kernels running."""


class NoInterference:
    """Every kernel progresses at its solo speed, whatever runs beside it."""

    def rates(self, kinds: Sequence[str]) -> list[float]:
        return [1.0] * len(kinds)


class UniformSlowdown:
    """Every kernel is slowed by ``factor`` per *other* kernel running (rate = 1/(1 + factor·(n-1))).

    A simple, documented stand-in used to exercise processor sharing in tests and what-if runs.
    """

    def __init__(self, factor: float):
        if factor < 0:
            raise ValueError(f"slowdown factor must be >= 0, got {factor}")
        self.factor = factor

    def rates(self, kinds: Sequence[str]) -> list[float]:
        n = len(kinds)
        return [1.0 / (1.0 + self.factor * (n - 1))] * n if n else []
