"""The small interface every policy implements.

A policy sees a clock and read-only *views* of the serving instances (queues, outstanding work, KV
use) and returns decisions. It never learns whether a simulated or a live backend runs it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, Sequence

from simcolo.workload.request import Request


class InstanceView(Protocol):
    index: int
    role: str
    num_blocks: int

    def outstanding_tokens(self, now: float) -> int: ...

    def kv_blocks_used(self, now: float) -> int: ...


class RoutingPolicy(ABC):
    """Chooses the instance a request goes to (for disaggregated serving: once per phase)."""

    name: str = "base"

    @abstractmethod
    def route(self, request: Request, instances: Sequence[InstanceView], now: float) -> int:
        """Return the position in ``instances`` of the chosen instance."""
