"""Least outstanding tokens: the instance with the fewest prefill + decode tokens still to compute.

Ties go to the lowest index, so the choice is deterministic.
"""
from __future__ import annotations

from typing import Sequence

from simcolo.policies.base import InstanceView, RoutingPolicy
from simcolo.workload.request import Request


def least_outstanding(instances: Sequence[InstanceView], now: float) -> int:
    best, best_load = 0, None
    for i, inst in enumerate(instances):
        load = inst.outstanding_tokens(now)
        if best_load is None or load < best_load:
            best, best_load = i, load
    return best


class LeastOutstandingTokens(RoutingPolicy):
    name = "least_outstanding"

    def route(self, request: Request, instances: Sequence[InstanceView], now: float) -> int:
        return least_outstanding(instances, now)
