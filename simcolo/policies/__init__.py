"""Pluggable policies. ``make_policy`` builds one from the Hydra ``policy`` config node."""
from __future__ import annotations

from simcolo.errors import ConfigError
from simcolo.policies.base import (CostPredictor, FinetunePolicy, InstanceView, NodeView, PipelinePolicy,
                                   RoutingPolicy)
from simcolo.policies.harli import FlexLLM, Harli, StaticShare
from simcolo.policies.isolated import Isolated
from simcolo.policies.least_outstanding import LeastOutstandingTokens
from simcolo.policies.lemix import LeMix
from simcolo.policies.mix_baselines import MixLeastUtilised, MixRandom, MixRoundRobin
from simcolo.policies.round_robin import RoundRobin
from simcolo.policies.tidal import Tidal

POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (
    RoundRobin, LeastOutstandingTokens, Isolated, MixRoundRobin, MixLeastUtilised, MixRandom, LeMix,
    Harli, StaticShare, FlexLLM, Tidal)}


def make_policy(cfg, rng=None) -> RoutingPolicy:
    name = cfg["name"]
    if name not in POLICIES:
        raise ConfigError(f"policy.name '{name}' is unknown; expected one of {sorted(POLICIES)}")
    return POLICIES[name](cfg, rng)


__all__ = ["InstanceView", "NodeView", "CostPredictor", "RoutingPolicy", "PipelinePolicy", "FinetunePolicy",
           "make_policy", "POLICIES"]
