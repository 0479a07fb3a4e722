"""A SimPy environment that can schedule events at absolute times.

``env.timeout(d)`` fires at ``now + d``, and ``now + (t - now)`` is not always bit-equal to ``t``.
The serving model computes iteration end times itself (a running sum, or ``numpy.cumsum`` over many
iterations at once) and needs events to fire at exactly those times, so that advancing many decode
iterations in one step gives bit-identical results to one event per iteration.
"""
from __future__ import annotations

from heapq import heappush

import simpy
from simpy.core import NORMAL, URGENT
from simpy.events import Event

__all__ = ["SimEnvironment", "At", "NORMAL", "URGENT"]


class SimEnvironment(simpy.Environment):
    def call_at(self, at: float, fn) -> None:
        """Call ``fn()`` at absolute time ``at`` (the clock interface parts shared with the live replay use)."""
        At(self, at).callbacks.append(lambda _ev: fn())

    def schedule_at(self, event: Event, at: float, priority: int = NORMAL) -> None:
        if at < self._now:
            raise ValueError(f"cannot schedule an event in the past: at={at!r} < now={self._now!r}")
        heappush(self._queue, (at, priority, next(self._eid), event))


class At(Event):
    """An event that fires at absolute time ``at`` (a Timeout with an absolute clock).

    ``priority=URGENT`` makes it fire before NORMAL events of the same instant: arrivals use it, so a
    request arriving exactly at an iteration boundary is seen by the scheduler at that boundary.
    """

    __slots__ = ()

    def __init__(self, env: SimEnvironment, at: float, value=None, priority: int = NORMAL):
        # Event.__init__ inlined: the serving model creates one of these per batch change.
        self.env = env
        self.callbacks = []
        self._ok = True
        self._value = value
        if at < env._now:
            raise ValueError(f"cannot schedule an event in the past: at={at!r} < now={env._now!r}")
        heappush(env._queue, (at, priority, next(env._eid), self))
