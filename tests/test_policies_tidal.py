"""tidal: its load forecaster on rates with known answers, its decisions on hand-built cases, and end to end on
the real SimPy model (SLO-bounded plans, zero training = serving alone, determinism)."""
import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_sim

from simcolo.policies.forecast import DecayedRate, TwoScaleForecaster
from simcolo.policies.tidal import Tidal
from simcolo.workload.request import Request


# ---------------------------------------------------------------------------------------------- forecaster
def _feed(forecaster, times, weight=1.0):
    for t in times:
        forecaster.add(float(t), weight)


def test_a_constant_rate_is_its_own_level_and_forecast_with_no_trend():
    f = TwoScaleForecaster(10.0, 120.0)
    _feed(f, np.arange(0.0, 600.0, 0.1))       # 10 events/s
    t = 600.0
    assert f.level(t) == pytest.approx(10.0, rel=0.01)
    assert f.forecast(t, 30.0) == pytest.approx(10.0, rel=0.01)
    assert abs(f.trend(t)) < 1e-3


def test_a_linear_ramp_gives_its_slope_and_the_rate_ahead():
    # rate(t) = 2 + 0.05 t: the k-th event at Lambda(t) = 2t + 0.025 t^2 = k; ten slow time scales of history
    t = 1200.0
    k = np.arange(1, int(2 * t + 0.025 * t**2))
    times = (-2.0 + np.sqrt(4.0 + 0.1 * k)) / 0.05
    f = TwoScaleForecaster(10.0, 120.0)
    _feed(f, times)
    assert f.trend(t) == pytest.approx(0.05, rel=0.01)
    assert f.level(t) == pytest.approx(2 + 0.05 * t, rel=0.005)
    assert f.forecast(t, 30.0) == pytest.approx(2 + 0.05 * (t + 30), rel=0.005)
    assert f.baseline(t) == pytest.approx(2 + 0.05 * (t - 120), rel=0.005)   # the slow scale lags by tau


def test_a_short_history_is_corrected_and_weights_count():
    r = DecayedRate(120.0)
    for t in np.arange(0.0, 2.0, 0.1):           # 2 s of a 10/s stream, each event weighing 100 tokens
        r.add(float(t), 100.0)
    assert r.rate(1.9) == pytest.approx(1000.0, rel=0.06)   # not 1.9/120 of it
    assert DecayedRate(5.0).rate(3.0) == 0.0
    with pytest.raises(ValueError):
        TwoScaleForecaster(120.0, 10.0)


# ---------------------------------------------------------------------------------------------- decisions
KNOBS = {"name": "tidal", "training_kind": "full", "release": "async", "memory_threshold": 0.8, "defer_factor": 5.0,
         "prefill_instances": 2, "decode_instances": 6, "max_micro_batch": 8, "lookahead_iterations": 128,
         "forecast_fast_s": 10.0, "forecast_slow_s": 120.0, "forecast_horizon_s": 30.0, "surge_threshold": 0.25,
         "feedback_window": 64, "feedback_quantile": 0.99, "feedback_target": 0.9, "feedback_every": 8,
         "spread_above": 0.3}


class _Predictor:
    ttft_slo_s, tpot_slo_s, seq_len = 1.0, 0.1, 1024

    def task_forward_s(self, S):
        return [1.0] * S

    def task_backward_s(self, S):
        return [2.0] * S

    def request_prefill_s(self, prompt):
        return prompt * 1e-4

    def decode_solo_s(self, batch, kv):
        return 0.005 + 0.0005 * batch + 1e-7 * kv


class _Node:
    role = "both"

    def __init__(self, backlog, wait=0.0, batch=0, kv_per_seq=1000):
        self.backlog, self.wait, self.batch, self.kv_per_seq = backlog, wait, batch, kv_per_seq
        self.num_stages, self.last_arrival_s = len(backlog), -math.inf

    def stage_backlogs_s(self):
        return list(self.backlog)

    def serving_wait_s(self, now):
        return self.wait

    def serving_rate(self):
        return 1.0

    def decode_load(self):
        return self.batch, self.kv_per_seq * self.batch

    def queue_blocked(self):
        return False

    def length_stats(self, training):
        return 0, 0.0, 0.0


class _Task:
    tokens = 1024


def _tidal(**changes):
    policy = Tidal({**KNOBS, **changes})
    policy.bind(_Predictor())
    return policy


def _finish(policy, now, ttft_s):
    """A request that finished at ``now`` with ``ttft_s`` to first token and 10 ms per output token."""
    r = Request(0, now - ttft_s - 0.1, 100, 11, first_token_s=now - 0.1, finish_s=now, status="finished")
    policy.on_request_finished(r, now)


def test_training_goes_to_the_node_with_the_most_headroom_not_the_busiest():
    nodes = [_Node([3.0, 3.0]), _Node([0.0, 0.0], wait=0.5), _Node([0.5, 0.5]), _Node([0.5, 0.5], wait=0.9)]
    # forward through 2 stages: RT 5, 2, 2.5, 2.5 (x unloaded 2: 2.5, 1, 1.25, 1.25) + serving pressure
    # 0, 0.5, 0, 0.9 -> node 2 (1.25); LeMix would pack onto the busiest node that meets its deferral bound
    assert _tidal().place_training(_Task(), nodes, _Predictor(), 1.0) == 2


def test_a_spread_request_joins_a_decoding_node_rather_than_open_a_co_run_beside_training():
    policy = _tidal()                       # training not saturated: requests are spread by headroom
    request = Request(0, 1.0, 100, 11)
    training_only = _Node([1.0, 1.0])                   # pressure ~0.06 (decode 5.5 ms of 100), no decode yet
    decoding = _Node([1.0, 1.0], wait=0.2, batch=4)     # pressure 0.21 (TTFT 0.21 s of 1 s)
    assert policy.route(request, [training_only, decoding], 1.0) == 1
    # a node that neither trains nor decodes opens no co-run either: the most headroom of those wins
    assert policy.route(request, [training_only, decoding, _Node([0.0, 0.0])], 1.0) == 2
    # the decoding node near its SLO (pressure 0.61, over JOIN_BELOW 0.5): the most headroom of all
    assert policy.route(request, [training_only, _Node([1.0, 1.0], wait=0.6, batch=4)], 1.0) == 0
    for _ in range(8):                      # TTFT tails at 0.7 of the SLO, over twice spread_above (0.6)
        _finish(policy, 2.0, 0.7)
    assert policy.ttft_pressure == pytest.approx(0.7)
    assert policy.route(request, [training_only, decoding], 2.0) == 0


def test_throttles_before_a_forecast_surge_and_releases_after_it():
    policy = _tidal()
    nodes = [_Node([0.0, 0.0]), _Node([0.0, 0.0])]
    t, rate = 0.0, 4.0
    while t < 300.0:                    # a steady 4 req/s: no surge, no throttle
        policy.observe_arrival(1000, t)
        t += 1.0 / rate
    for _ in range(16):                 # tails near the SLO: little headroom
        _finish(policy, t, 0.8)
    assert policy.pressure == pytest.approx(0.8) and policy.gain == 1.0
    assert policy.intensity(t) == 1.0 and policy.place_training(_Task(), nodes, _Predictor(), t) is not None
    # the rate starts to climb, 4 -> 12 req/s over 40 s; within 20 s (rate 8, half-way up) the forecast sees the
    # surge and training waits
    throttled_at = None
    while t < 340.0:
        rate = 4.0 + 0.2 * (t - 300.0)
        policy.observe_arrival(1000, t)
        if throttled_at is None and policy.place_training(_Task(), nodes, _Predictor(), t) is None:
            throttled_at = t
        t += 1.0 / rate
    assert throttled_at is not None and throttled_at < 320.0
    assert policy.intensity(t) < 0.2
    # the load holds at 12 req/s: the forecast levels off and training is placed again
    while t < 700.0:
        policy.observe_arrival(1000, t)
        t += 1.0 / 12.0
    assert policy.rise(t) < 1.1
    assert policy.intensity(t) == 1.0 and policy.place_training(_Task(), nodes, _Predictor(), t) is not None


def test_a_surge_on_an_idle_fleet_costs_no_training():
    policy = _tidal()
    t = 0.0
    while t < 300.0:
        policy.observe_arrival(1000, t)
        t += 0.25
    for _ in range(16):
        _finish(policy, t, 0.05)        # tails far from the SLO
    while t < 330.0:
        policy.observe_arrival(1000, t)
        t += 1.0 / (4.0 + 0.3 * (t - 300.0))
    assert policy.rise(t) > 1.5           # a full surge is forecast (twice the threshold) ...
    assert policy.pressure == pytest.approx(0.1)   # (TPOT 10 ms of 100 ms: the larger tail)
    assert policy.intensity(t) == 1.0     # ... but a throttle of surge x pressure = 0.1 is under the dead band
    for _ in range(16):
        _finish(policy, t, 0.3)             # tails at 0.3 of the SLO: the same surge throttles by 0.3
    assert policy.pressure == pytest.approx(0.3) and policy.intensity(t) == pytest.approx(0.7)


def test_tails_over_the_target_halve_the_intensity_and_recover_below_it():
    policy = _tidal()
    for _ in range(8):
        _finish(policy, 10.0, 0.95)
    assert policy.gain == 0.5
    for _ in range(8):
        _finish(policy, 11.0, 0.95)
    assert policy.gain == 0.25
    # at a gain of 0.25 a task may queue 1.25 x its unloaded forward: only an empty pipeline takes it
    assert policy.place_training(_Task(), [_Node([1.0, 1.0])], _Predictor(), 11.0) is None
    assert policy.place_training(_Task(), [_Node([1.0, 1.0]), _Node([0.0, 0.0])], _Predictor(), 11.0) == 1
    for _ in range(64):                  # the window (64) fills with fast requests
        _finish(policy, 12.0, 0.1)
    gain = policy.gain
    for _ in range(8):
        _finish(policy, 13.0, 0.1)
    assert policy.pressure == pytest.approx(0.1) and policy.gain == pytest.approx(gain + 0.1)


def test_the_layout_follows_the_job():
    assert _tidal().layout == "pipelines"
    assert _tidal(training_kind="lora").layout == "finetune"
    assert _tidal(training_kind="none").layout == "pipelines"


# ---------------------------------------------------------------------------------------------- end to end
SLICE = ["cluster=h100x8", "workload.max_requests=600", "workload.rate_scale=4"]


def test_tidal_never_predicts_a_decode_latency_above_the_slo_for_the_share_it_picks():
    slo = 0.009    # tight: the solo decode itself misses it at times, so some plans are infeasible
    r = run_sim("policy=tidal_lora", *SLICE, "workload.rate_scale=8", f"slo.tpot_s={slo}", "policy.max_micro_batch=2")
    plans = [p for ft in r.backend.finetuners for p in ft.plans]
    running = [p for p in plans if p[4] > 0 and p[1] > 0]
    assert running and any(p[4] == 0 for p in plans)
    assert max(p[5] for p in running) <= slo


@pytest.mark.parametrize("job", ["full", "lora"])
def test_zero_training_work_gives_the_serving_alone_results(job):
    policy = "tidal" if job == "full" else "tidal_lora"
    busy = run_sim(f"policy={policy}", *SLICE, "training.data.backlog=0")
    blocks = busy.system.kv_budget.num_blocks
    alone = run_sim(f"policy={policy}", *SLICE, "training=none", f"policy.training_kind={job}", "training.stages=2",
                    f"serving.num_gpu_blocks_override={blocks}")
    assert busy.summary["train_tasks_done"] == 0 and alone.summary["training_kind"] == "none"
    assert busy.summary["layout"] == alone.summary["layout"] == ("pipelines" if job == "full" else "finetune")
    pd.testing.assert_frame_equal(busy.requests(), alone.requests())


@pytest.mark.parametrize("policy", ["tidal", "tidal_lora"])
def test_same_config_and_seed_give_identical_results(policy):
    a = run_sim(f"policy={policy}", *SLICE, "seed=3")
    b = run_sim(f"policy={policy}", *SLICE, "seed=3")
    assert a.summary["train_tasks_done"] > 0
    pd.testing.assert_frame_equal(a.requests(), b.requests())
    pd.testing.assert_frame_equal(a.training, b.training)
    assert a.summary == b.summary


def test_queued_sequences_without_kv_count_one_token_each_in_the_decode_estimate():
    # three requests queued on a training node, none admitted: batch 3, no KV yet. The real predictor (the
    # shipped H100 tables) counts one token per sequence (the decode grid's edge), not 0 (an off-grid
    # query), and Tidal's serving pressure is that estimate over the TPOT SLO
    import warnings

    from simcolo.config.compose import load_config
    from simcolo.config.run import RunConfig
    from simcolo.costs import OffGridWarning
    from simcolo.hardware.cluster import Topology
    from simcolo.layout.plan import plan_layout
    from simcolo.policies import make_policy

    run = RunConfig.from_cfg(load_config(["cluster=h100x8", "policy=tidal"]))
    policy = make_policy(run.policy, np.random.default_rng(0))
    pred = plan_layout(run, policy, Topology.from_config(run.gpu, run.cluster)).predictor
    policy.bind(pred)
    queued = _Node([1.0, 1.0], batch=3, kv_per_seq=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffGridWarning)
        assert pred.decode_solo_s(3, 0) == pred.cost.decode_s(3, 3)
        assert policy._serving_pressure(queued, 1.0) == pytest.approx(pred.cost.decode_s(3, 3) / pred.tpot_slo_s)
        # a request on top of them: its prompt is its KV
        assert policy._serving_pressure(queued, 1.0, 0.0, 200) == pytest.approx(
            pred.cost.decode_s(4, 200) / pred.tpot_slo_s)
