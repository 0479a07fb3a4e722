"""The naive co-location baselines of the LeMix paper: every node serves and trains, and both kinds of
task are placed without prediction.

* ``mix_rr`` — round robin (one turn for requests, one for training tasks);
* ``mix_luf`` — least utilised first: the node with the least work placed on it (its largest training
  stage backlog plus its serving queue, in seconds);
* ``mix_random`` — uniformly at random (the run's seeded generator).

All three release training tasks synchronously (one task in a node's pipeline at a time) and have no
memory gate: the paper's baselines do not overlap training samples in a pipeline.
"""
from __future__ import annotations

from simcolo.policies.base import PipelinePolicy
from simcolo.policies.round_robin import Cycle


def node_load_s(node, now: float) -> float:
    return max(node.stage_backlogs_s()) + node.serving_wait_s(now)


def least_utilised(nodes, now: float) -> int:
    loads = [node_load_s(n, now) for n in nodes]
    return loads.index(min(loads))


class MixRoundRobin(PipelinePolicy):
    name = "mix_rr"
    release = "sync"

    def __init__(self, cfg=None, rng=None):
        super().__init__(cfg, rng)
        self._cycle = Cycle()

    def route(self, request, instances, now):
        return self._cycle.next("requests", len(instances))

    def place_training(self, task, nodes, predictor, now):
        return self._cycle.next("training", len(nodes))


class MixLeastUtilised(PipelinePolicy):
    name = "mix_luf"
    release = "sync"

    def route(self, request, instances, now):
        return least_utilised(instances, now)

    def place_training(self, task, nodes, predictor, now):
        return least_utilised(nodes, now)


class MixRandom(PipelinePolicy):
    name = "mix_random"
    release = "sync"

    def route(self, request, instances, now):
        return int(self.rng.integers(len(instances)))

    def place_training(self, task, nodes, predictor, now):
        return int(self.rng.integers(len(nodes)))
