"""A small load forecaster for event streams (request arrivals): exponentially decayed rates at two time
scales, and the linear trend their difference reveals.

For events at times t_i with weights w_i (1 per request, or its prompt tokens), the decayed rate at scale
tau is ``S_tau(t) = sum_i w_i exp(-(t - t_i) / tau) / tau``. For a stream whose weight rate is constant,
``S_tau`` estimates that rate; for a rate rising linearly, ``r(t) = a + b t``, its expectation is
``a + b (t - tau)``: each scale sees the rate as it was ``tau`` seconds ago. Two scales therefore give
the slope, ``b = (S_fast - S_slow) / (tau_slow - tau_fast)``, the level now, ``S_fast + b tau_fast``, and
the forecast ``horizon`` seconds ahead, ``S_fast + b (tau_fast + horizon)`` (the two-EWMA reading of
Holt's linear smoothing, in continuous time, so irregular arrivals need no binning). Early on, a scale
has seen less than its own length of history; its sum is divided by ``1 - exp(-elapsed / tau)`` (the
bias correction of an EWMA started at zero, as Adam's moments are corrected).

O(1) per event and per query; nothing is stored but the sums.
"""
from __future__ import annotations

import math


class DecayedRate:
    """``S_tau(t)`` of one weighted event stream."""

    __slots__ = ("_at", "_start", "_sum", "tau")

    def __init__(self, tau_s: float):
        if not tau_s > 0:
            raise ValueError(f"tau_s must be > 0, got {tau_s!r}")
        self.tau = tau_s
        self._sum = 0.0            # sum of w_i exp(-(at - t_i) / tau)
        self._at = None            # time the sum is decayed to
        self._start = None         # first event

    def add(self, t: float, weight: float = 1.0) -> None:
        if self._at is None:
            self._start = self._at = t
        elif t > self._at:
            self._sum *= math.exp(-(t - self._at) / self.tau)
            self._at = t
        self._sum += weight

    def rate(self, t: float) -> float:
        """The decayed rate at ``t`` (>= the last event), bias-corrected for a short history."""
        if self._at is None:
            return 0.0
        s = self._sum * math.exp(-max(t - self._at, 0.0) / self.tau)
        elapsed = t - self._start
        seen = 1.0 - math.exp(-elapsed / self.tau) if elapsed > 0 else 0.0
        return s / (self.tau * seen) if seen > 0 else 0.0


class TwoScaleForecaster:
    """Level, trend and forecast of a weighted event stream's rate from two decayed rates."""

    __slots__ = ("fast", "slow")

    def __init__(self, fast_s: float, slow_s: float):
        if not slow_s > fast_s > 0:
            raise ValueError(f"need slow_s > fast_s > 0, got fast_s={fast_s!r}, slow_s={slow_s!r}")
        self.fast, self.slow = DecayedRate(fast_s), DecayedRate(slow_s)

    def add(self, t: float, weight: float = 1.0) -> None:
        self.fast.add(t, weight)
        self.slow.add(t, weight)

    def trend(self, t: float) -> float:
        """Slope of the rate (weight per second, per second)."""
        return (self.fast.rate(t) - self.slow.rate(t)) / (self.slow.tau - self.fast.tau)

    def level(self, t: float) -> float:
        """The rate now (the fast scale's lag corrected by the trend)."""
        return self.fast.rate(t) + self.trend(t) * self.fast.tau

    def forecast(self, t: float, horizon_s: float) -> float:
        """The rate ``horizon_s`` seconds after ``t``, never below 0."""
        return max(self.fast.rate(t) + self.trend(t) * (self.fast.tau + horizon_s), 0.0)

    def baseline(self, t: float) -> float:
        """The slow scale's rate: what the load has been lately, the reference a surge is measured against."""
        return self.slow.rate(t)
