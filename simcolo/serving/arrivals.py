"""Feeds a lazily read workload into the simulation: one event per arrival, one request in hand."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator

from simcolo.hardware.environment import URGENT, At, SimEnvironment
from simcolo.workload.request import Request


class ArrivalFeed:
    """Schedules each request at its exact arrival time with URGENT priority, so that a request
    arriving exactly at an iteration boundary is seen by the scheduler at that boundary.

    Only the next request is held; the stream is read as the clock reaches it (bounded memory).
    """

    def __init__(self, env: SimEnvironment, requests: Iterable[Request], dispatch: Callable[[Request], None]):
        self.env = env
        self._it: Iterator[Request] = iter(requests)
        self._dispatch = dispatch
        self._next: Request | None = None
        self.done = False
        self._schedule_next()

    def _schedule_next(self) -> None:
        r = next(self._it, None)
        self._next = r
        if r is None:
            self.done = True
            return
        At(self.env, r.arrival_s, priority=URGENT).callbacks.append(self._arrive)

    @property
    def next_s(self) -> float:
        """When the next request arrives (infinity: none left)."""
        return math.inf if self._next is None else self._next.arrival_s

    def _arrive(self, _event) -> None:
        r = self._next
        self._schedule_next()
        self._dispatch(r)

    def remaining(self) -> Iterator[Request]:
        """Requests not yet arrived (the one scheduled, then the rest of the stream)."""
        head = [self._next] if self._next is not None else []
        self._next = None
        self.done = True
        return itertools.chain(head, self._it)
