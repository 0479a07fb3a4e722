"""Isolated: a fixed split of the GPUs, some serve and some train (``policy.serving_gpus``).

Serving replicas route requests to the instance with the least outstanding tokens and get the
trained weights only at weight syncs (every ``policy.sync_every`` optimizer steps).
"""
from __future__ import annotations

from simcolo.policies.base import RoutingPolicy, knobs
from simcolo.policies.least_outstanding import least_outstanding


class Isolated(RoutingPolicy):
    name = "isolated"
    layout = "isolated"
    config_keys = ("serving_gpus", "sync_every")

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        g = knobs(cfg)
        self.serving_gpus = g.int("serving_gpus", min=1)   # GPUs 0 .. serving_gpus-1 serve, the rest train
        self.sync_every = g.int("sync_every", min=1)       # optimizer steps between weight syncs

    def route(self, request, instances, now):
        return least_outstanding(instances, now)
