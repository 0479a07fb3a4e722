"""Round robin: each request to the next instance in turn (one counter per instance group)."""
from __future__ import annotations

from typing import Sequence

from simcolo.policies.base import InstanceView, RoutingPolicy
from simcolo.workload.request import Request


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self):
        self._next: dict[int, int] = {}

    def route(self, request: Request, instances: Sequence[InstanceView], now: float) -> int:
        key = id(instances)
        i = self._next.get(key, 0)
        self._next[key] = (i + 1) % len(instances)
        return i
