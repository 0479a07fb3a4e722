"""LeMix's prediction and placement score on small cases worked by hand."""
import math

import pytest

from simcolo.policies.lemix import LeMix, gaussian_density, lemix_score, predict_training


def test_prediction_blocks_on_earlier_backward_passes_and_counts_idle_gaps():
    # two stages, forward 1 s per stage; RT = completion of the task's forward
    assert predict_training([1, 1], [0, 0]) == (2.0, 1.0)     # stage 1 idles 1 s waiting for F0
    # stage 1 still has 3 s of earlier backward work: F1 starts at 3, no idle gap
    assert predict_training([1, 1], [0, 3]) == (4.0, 0.0)
    # stage 0 busy 2 s: F0 [2,3], stage 1 free since 0.5 -> idles 2.5 s; F1 [3,4]
    assert predict_training([1, 1], [2, 0.5]) == (4.0, 2.5)


def test_score_formula():
    # IP = -max(II/S - da, tau); score = (IP + beta*LC) / (alpha*RT)
    assert lemix_score(rt=2.0, ii=1.0, num_stages=2, since_arrival_s=0.0, lc=0.4, alpha=0.15, beta=0.05,
                       tau=0.2) == pytest.approx((-0.5 + 0.02) / 0.3)
    # a node that saw an arrival long ago: II/S - da < tau, so IP = -tau
    assert lemix_score(2.0, 1.0, 2, 10.0, 0.0, 0.15, 0.05, 0.2) == pytest.approx(-0.2 / 0.3)
    assert gaussian_density(5.0, 5.0, 2.0) == pytest.approx(1 / (2 * math.sqrt(2 * math.pi)))


class _Node:
    def __init__(self, backlog, last, stats=(0, 0.0, 0.0)):
        self.backlog, self.last_arrival_s, self.stats, self.num_stages = backlog, last, stats, len(backlog)

    def stage_backlogs_s(self):
        return list(self.backlog)

    def length_stats(self, training):
        return self.stats


class _Predictor:
    def task_forward_s(self, S):
        return [1.0] * S

    def task_backward_s(self, S):
        return [2.0] * S


def _lemix():
    return LeMix({"alpha": 0.15, "beta": 0.05, "tau": 0.2, "defer_factor": 5.0, "memory_threshold": None,
                  "release": "async", "expected_output_tokens": 256, "decode_slo_fraction": 0.5})


class _Task:
    tokens = 1024


def test_placement_picks_the_node_the_formula_says():
    now = 10.0
    nodes = [_Node([0, 0], last=9.9), _Node([0, 3], last=9.9), _Node([2, 0.5], last=9.0)]
    # node 0: RT 2, II 1 -> IP = -max(0.5 - 0.1, 0.2) = -0.4 ; node 1: RT 4, II 0 -> IP -0.2
    # node 2: RT 4, II 2.5 -> IP = -max(1.25 - 1.0, 0.2) = -0.25 ; LC equal (peak density, std 1)
    lc = 0.05 * gaussian_density(1024, 1024, 1)
    expected = [(-0.4 + lc) / (0.15 * 2), (-0.2 + lc) / (0.15 * 4), (-0.25 + lc) / (0.15 * 4)]
    assert _lemix().place_training(_Task(), nodes, _Predictor(), now) == expected.index(max(expected)) == 1


def test_training_beyond_five_times_the_unloaded_forward_is_deferred():
    policy = _lemix()
    # unloaded forward = 2 s; RT must stay <= 10 s: a stage-0 backlog of 9 s gives RT = 9+1+1 = 11
    assert policy.place_training(_Task(), [_Node([9, 0], last=0.0)], _Predictor(), 1.0) is None
    assert policy.deferred == 1
    assert policy.place_training(_Task(), [_Node([9, 0], last=0.0), _Node([7.9, 0], last=0.0)], _Predictor(), 1.0) == 1


class _ServingNode(_Node):
    def __init__(self, wait, batch, last=0.0):
        super().__init__([0, 0], last)
        self.wait, self.batch = wait, batch

    def serving_wait_s(self, now):
        return self.wait

    def serving_rate(self):
        return 1.0

    def decode_load(self):
        return self.batch, self.batch * 100

    def queue_blocked(self):
        return False


class _ServingPredictor:
    ttft_slo_s, tpot_slo_s = 1.0, 0.1

    def request_prefill_s(self, prompt):
        return 0.05

    def decode_solo_s(self, batch, kv):
        return 0.01 * batch          # 10 ms per sequence in the batch


class _Request:
    prompt_tokens = 100


def test_requests_go_to_the_highest_scoring_feasible_node():
    policy = _lemix()
    policy.bind(_ServingPredictor())
    # RT = wait + 0.05 + 256 * 0.01 * (batch + 1); feasible: wait + 0.05 <= 1 and 0.01 (batch + 1) <= 0.05
    nodes = [_ServingNode(0.0, 1), _ServingNode(0.2, 3), _ServingNode(0.0, 6)]   # node 2: decode too slow
    # node 0: RT 0.05 + 5.12 = 5.17 ; node 1: RT 0.25 + 10.24 = 10.49 ; both IP = -tau, same LC: the
    # larger RT scores higher (the score packs work onto busy nodes)
    assert policy.route(_Request(), nodes, 10.0) == 1
    # nothing feasible: the smallest RT
    assert policy.route(_Request(), [_ServingNode(2.0, 1), _ServingNode(1.5, 1)], 10.0) == 1
