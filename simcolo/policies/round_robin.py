"""Round robin: each request to the next instance in turn (one counter per instance group)."""
from __future__ import annotations

from typing import Sequence

from simcolo.policies.base import InstanceView, RoutingPolicy
from simcolo.workload.request import Request


class Cycle:
    """A counter per group of choices: 0, 1, ..., n-1, 0, ... A group is named by a hashable key the
    caller chooses (e.g. the instances' roles), never by an object's identity."""

    def __init__(self):
        self._next: dict[object, int] = {}

    def next(self, key, n: int) -> int:
        i = self._next.get(key, 0) % n
        self._next[key] = (i + 1) % n
        return i


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self, cfg=None, rng=None):
        super().__init__(cfg, rng)
        self._cycle = Cycle()

    def route(self, request: Request, instances: Sequence[InstanceView], now: float) -> int:
        # one turn per instance group: entry instances and (disaggregated) decode instances
        return self._cycle.next(instances[0].role if instances else None, len(instances))
