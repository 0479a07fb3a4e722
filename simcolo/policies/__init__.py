"""Pluggable policies. ``make_policy`` builds one from the Hydra ``policy`` config node."""
from __future__ import annotations

from simcolo.errors import ConfigError
from simcolo.policies.base import InstanceView, RoutingPolicy
from simcolo.policies.least_outstanding import LeastOutstandingTokens
from simcolo.policies.round_robin import RoundRobin

POLICIES: dict[str, type[RoutingPolicy]] = {
    RoundRobin.name: RoundRobin,
    LeastOutstandingTokens.name: LeastOutstandingTokens,
}


def make_policy(cfg) -> RoutingPolicy:
    name = cfg["name"]
    if name not in POLICIES:
        raise ConfigError(f"policy.name '{name}' is unknown; expected one of {sorted(POLICIES)}")
    return POLICIES[name]()


__all__ = ["InstanceView", "RoutingPolicy", "make_policy", "POLICIES"]
