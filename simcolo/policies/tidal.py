"""tidal: co-location that places training where there is headroom, shares decode GPUs as Harli does, throttles
training ahead of a forecast rise in load and closes the loop on measured latency tails.

Layouts (``policy.training_kind``, composed from ``training.kind``):

* ``full`` (full-parameter training) — the **pipelines** layout of LeMix: every node of ``training.stages``
  GPUs serves one replica and trains it as a pipeline. A training task goes to the node whose pipeline
  would finish its forward soonest plus that node's serving pressure (the node with the most headroom,
  where LeMix packs onto busy nodes), and is deferred when every node's predicted forward exceeds
  ``defer_factor`` x the unloaded one scaled by the training intensity (below), or every node's serving is
  at its SLO. Requests are packed as LeMix packs them (its feasibility-checked score) while training lacks
  room (a task deferred for want of room, or two tasks queued ahead of it on the best node) and the TTFT
  tail, scaled by the forecast rise, is under ``spread_above`` of the SLO: packing leaves other nodes'
  training unslowed. Otherwise requests are spread by serving headroom, the smallest
  ``max(TTFT_pred / TTFT SLO, decode_pred / TPOT SLO)`` (a queue blocked behind a full batch or KV cache
  counts one more). While that score is under ``JOIN_BELOW`` and the TTFT tail (x the forecast rise) is
  under twice ``spread_above``, each goes to the node with the most headroom among those where it opens no
  new co-run beside training (the node already decodes, or does not train): a co-run slows the training it
  joins for as long as the decode lasts. Otherwise, to the node with the most headroom of all. A task
  deferred by the throttle alone leaves requests spread, to meet the surge the throttle expects. Deferred
  tasks are offered again as tasks complete *and* as requests arrive
  (``retry_on_arrival``), so a throttle lifts without waiting for training to finish. Asynchronous release
  and LeMix's memory gate (``release``, ``memory_threshold``).
* ``lora`` (LoRA finetuning) — the **finetune** layout of Harli: prefill/decode disaggregated
  (``prefill_instances`` + ``decode_instances``), a finetuner on every decode GPU, one block pool with decode
  priority. Per decode iteration, Harli's two-stage predictor and search (``simcolo.policies.harli``):
  the most token-efficient micro-batch memory allows, and the share with the highest finetune rate whose
  predicted co-run decode iteration is within the TPOT target. The candidates add plain streams (no SM
  partition, ``None``) to Harli's shares when the interference table has them, and the target is the TPOT
  SLO scaled by the intensity margin; the prediction is made for the decode batch *forecast* a horizon
  ahead (the batch now x the forecast rise in the arrival rate), so the share leaves room before a
  surge. The share it picks never has a predicted decode iteration above the TPOT SLO.
* ``none`` — serves alone on the pipelines layout, routed as above.

The training intensity in [0, 1] (1: as much training as fits) is the smaller of two signals:

* **forecast** (:mod:`simcolo.policies.forecast`): decayed request and prompt-token rates at two time
  scales (``forecast_fast_s``, ``forecast_slow_s``) give a trend and a forecast ``forecast_horizon_s``
  ahead. A forecast above ``1 + surge_threshold`` x the slow baseline is a surge; its size s (0 at the
  threshold, 1 at twice it) throttles by ``s x (1 - headroom)``, headroom being 1 - the measured tail
  pressure (below), ignored under ``DEAD_BAND`` (0.2), so a rise on an idle fleet costs nothing and a rise
  on a loaded one defers training before the queue builds. When the forecast falls back, the throttle is released.
* **feedback**: the ``feedback_quantile`` of the last ``feedback_window`` finished requests' TTFT and
  TPOT, each over its SLO; the larger is the tail pressure. Above ``feedback_target`` the gain is halved
  (every ``feedback_every`` finished requests); below it, it recovers by 0.1 (AIMD).

It never refuses a request: requests are always routed; only training waits.

Decisions of ours: the weights of the headroom score (pressure weight 1), the AIMD steps, the surge
ramp, ``SATURATED``, ``JOIN_BELOW``, ``DEAD_BAND``, ``MAX_RISE`` and the lowest margin of the decode
target (``MIN_MARGIN``, 0.7 of the TPOT SLO); the knobs' values in conf/policy/tidal.yaml were tuned once,
for every grid point together, on the shipped roofline tables (``JOIN_BELOW`` on the v4 tables).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from simcolo.errors import ConfigError, TableError
from simcolo.policies.base import knobs
from simcolo.policies.forecast import TwoScaleForecaster
from simcolo.policies.harli import SHARES, Harli, ranked_by_rate
from simcolo.policies.lemix import LeMix, predict_training

#: training.kind -> the layout tidal builds
LAYOUT_OF_JOB = {"full": "pipelines", "lora": "finetune", "none": "pipelines"}
#: the lowest fraction of the TPOT SLO the decode target falls to when training is throttled
MIN_MARGIN = 0.7
#: a forecast rise larger than this factor is planned for as this factor (a burst is not extrapolated)
MAX_RISE = 2.0
#: a training task placed where its forward is predicted to take more than this x the unloaded one (two tasks
#: queued ahead of it on the best node) means training has more work than room: requests are then packed
SATURATED = 3.0
#: a spread request joins the node with the most serving headroom among those where it opens no co-run beside
#: training (already decoding, or not training) while that node's serving pressure is under this (and the TTFT
#: tail under twice spread_above); otherwise, the node with the most headroom of all. A co-run slows both sides
#: (~1.8x each for decode beside training on plain streams, roofline v4), and a decode iteration costs about
#: the same at batch 1 as at batch 16
JOIN_BELOW = 0.5
#: a forecast throttle smaller than this is ignored (a rise on a fleet with most of its headroom, or forecast
#: noise): it would cost training and change nothing the SLO sees
DEAD_BAND = 0.2
#: LeMix's request placement (its paper's constants, conf/policy/lemix.yaml), used while tails have headroom
PACKING = {"alpha": 0.15, "beta": 0.05, "tau": 0.2, "defer_factor": 5.0, "memory_threshold": None, "release": "async",
           "expected_output_tokens": 256, "decode_slo_fraction": 0.5}


class Tidal(Harli):
    name = "tidal"
    layout = "pipelines"        # the default job (full); an instance takes the layout of its training_kind
    config_keys = ("training_kind", "prefill_instances", "decode_instances", "max_micro_batch",
                   "lookahead_iterations", "memory_threshold", "release", "defer_factor", "forecast_fast_s",
                   "forecast_slow_s", "forecast_horizon_s", "surge_threshold", "feedback_window",
                   "feedback_quantile", "feedback_target", "feedback_every", "spread_above")
    retry_on_arrival = True

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        g = knobs(cfg)
        self.training_kind = g.choice("training_kind", tuple(LAYOUT_OF_JOB))
        self.layout = LAYOUT_OF_JOB[self.training_kind]
        self.release = g.choice("release", ("async", "sync"))
        self.memory_threshold = g.fraction("memory_threshold", "(0, 1]", optional=True)
        self.defer_factor = g.float("defer_factor", gt=0)
        fast, slow = g.float("forecast_fast_s", gt=0), g.float("forecast_slow_s", gt=0)
        if not slow > fast:
            raise ConfigError(f"{g.key('forecast_slow_s')}={slow:g} must be greater than "
                              f"{g.key('forecast_fast_s')}={fast:g}")
        self.horizon = g.float("forecast_horizon_s", ge=0)
        self.surge = g.float("surge_threshold", gt=0)
        self.window = g.int("feedback_window", min=1)
        self.quantile = g.fraction("feedback_quantile", "(0, 1]")
        self.target = g.float("feedback_target", gt=0)
        self.every = g.int("feedback_every", min=1)
        self.requests = TwoScaleForecaster(fast, slow)
        self.prompts = TwoScaleForecaster(fast, slow)
        self._ttft: deque[float] = deque(maxlen=self.window)
        self._tpot: deque[float] = deque(maxlen=self.window)
        self._finished = 0
        self.pressure = 0.0          # measured tail / SLO (the larger of TTFT and TPOT)
        self.ttft_pressure = self.tpot_pressure = 0.0
        self.gain = 1.0              # the feedback's intensity
        self.clock = 0.0             # the latest time the policy has seen
        self.deferred = 0
        self.saturated = False       # training waits for room (the last task was deferred or queued deep)
        self._candidates: list[tuple[float | None, float]] | None = None
        self.spread_above = g.float("spread_above", ge=0)
        self._packer = LeMix(PACKING)

    def bind(self, predictor) -> None:
        super().bind(predictor)
        self._packer.bind(predictor)

    # ------------------------------------------------------------------ what the policy observes
    def observe_arrival(self, prompt_tokens: int, now: float) -> None:
        self.clock = max(self.clock, now)
        self.requests.add(now, 1.0)
        self.prompts.add(now, float(prompt_tokens))

    def on_request_finished(self, request, now: float) -> None:
        self.clock = max(self.clock, now)
        if request.status != "finished" or request.first_token_s is None:
            return
        slo = self.predictor
        self._ttft.append((request.first_token_s - request.arrival_s) / slo.ttft_slo_s)
        if request.output_tokens > 1:
            self._tpot.append((request.finish_s - request.first_token_s) / (request.output_tokens - 1)
                              / slo.tpot_slo_s)
        self._finished += 1
        if self._finished % self.every == 0:
            self.update_feedback()

    def update_feedback(self) -> None:
        self.ttft_pressure, self.tpot_pressure = (
            float(np.quantile(np.fromiter(x, float), self.quantile)) if x else 0.0 for x in (self._ttft, self._tpot))
        self.pressure = max(self.ttft_pressure, self.tpot_pressure)
        if self.pressure > self.target:
            self.gain = max(self.gain * 0.5, 0.0)
        else:
            self.gain = min(self.gain + 0.1, 1.0)

    def rise(self, now: float) -> float:
        """Forecast over baseline of the request and prompt-token rates, the larger (1: no rise)."""
        out = 1.0
        for f in (self.requests, self.prompts):
            base = f.baseline(now)
            if base > 0:
                out = max(out, f.forecast(now, self.horizon) / base)
        return out

    def intensity(self, now: float) -> float:
        """How much of the training that fits may run now, in [0, 1]."""
        surge = min(max((self.rise(now) - 1.0 - self.surge) / self.surge, 0.0), 1.0)
        headroom = min(max(1.0 - self.pressure, 0.0), 1.0)
        throttle = surge * (1.0 - headroom)
        return min(1.0 - (throttle if throttle >= DEAD_BAND else 0.0), self.gain)

    # ------------------------------------------------------------------ requests
    def route(self, request, instances, now):
        if instances[0].role == "decode":          # the decode side of a disaggregated request
            return super().route(request, instances, now)
        self.observe_arrival(request.prompt_tokens, now)
        if self.layout != "pipelines":
            return super().route(request, instances, now)
        # the TTFT tail as it will be if the load rises as forecast (queueing grows at least with the load)
        if self.saturated and self.ttft_pressure * min(self.rise(now), MAX_RISE) < self.spread_above:
            return self._packer.route(request, instances, now)
        pred = self.predictor
        prefill = pred.request_prefill_s(request.prompt_tokens)
        best = joins = None
        for i, node in enumerate(instances):
            p = self._serving_pressure(node, now, prefill, request.prompt_tokens)
            if best is None or p < best[0]:
                best = (p, i)
            if not self._opens_corun(node) and (joins is None or p < joins[0]):
                joins = (p, i)
        if (joins is not None and joins[0] < JOIN_BELOW
                and self.ttft_pressure * min(self.rise(now), MAX_RISE) < 2.0 * self.spread_above):
            return joins[1]
        return best[1]

    @staticmethod
    def _opens_corun(node) -> bool:
        """A request placed here would start serving beside training: the node is training and decodes nothing
        (on a node already decoding, one more sequence adds little to the co-run it already has)."""
        batch, _ = node.decode_load()
        return batch == 0 and any(b > 0 for b in node.stage_backlogs_s())

    def _serving_pressure(self, node, now: float, prefill_s: float = 0.0, prompt: int = 0) -> float:
        """max(predicted TTFT / TTFT SLO, predicted decode iteration / TPOT SLO) on a co-located node, + 1 if
        its queue is blocked (a request would wait an unpredictable time)."""
        pred = self.predictor
        rate = node.serving_rate()
        batch, kv = node.decode_load()
        ttft = (node.serving_wait_s(now) + prefill_s) / rate
        step = pred.decode_solo_s(batch + (1 if prompt else 0), kv + prompt) / rate if batch or prompt else 0.0
        return max(ttft / pred.ttft_slo_s, step / pred.tpot_slo_s) + (1.0 if node.queue_blocked() else 0.0)

    # ------------------------------------------------------------------ full training on co-located pipelines
    def place_training(self, task, nodes, predictor, now):
        self.clock = max(self.clock, now)
        k = self.intensity(now)
        S = nodes[0].num_stages
        fwd = predictor.task_forward_s(S)
        unloaded = sum(fwd)
        budget = k * self.defer_factor * unloaded
        best, room = None, False
        for i, node in enumerate(nodes):
            rt, _ = predict_training(fwd, node.stage_backlogs_s())
            if rt > self.defer_factor * unloaded:
                continue
            p = self._serving_pressure(node, now)
            if p >= 1.0:
                continue
            room = True                      # a node could take it at full intensity
            if rt > budget:
                continue
            score = rt / unloaded + p
            if best is None or score < best[0]:
                best = (score, i, rt / unloaded)
        if best is None:
            self.deferred += 1
            # deferred for want of room: training is saturated; deferred by the throttle alone (a surge is
            # expected): requests are spread to meet it
            self.saturated = not room
            return None
        self.saturated = best[2] > SATURATED
        return best[1]

    # ------------------------------------------------------------------ LoRA on decode GPUs
    def plan_finetune(self, state, predictor, running_micro_batch):
        mb = running_micro_batch or self._mb_limit(state, predictor)
        if mb <= 0 or state.decode_batch == 0:
            return self._plan_without_decode(predictor, mb, running_micro_batch)
        now = self.clock
        k = self.intensity(now)
        target = predictor.tpot_slo_s * (1.0 - (1.0 - k) * (1.0 - MIN_MARGIN))
        rise = min(self.rise(now), MAX_RISE) if k < 1.0 else 1.0
        batch = max(state.decode_batch, math.ceil(state.decode_batch * rise))
        kv = state.decode_kv_tokens * batch / state.decode_batch + batch * self.lookahead
        solo = predictor.decode_solo_s(batch, int(kv))
        return self._first_feasible(predictor, solo, target, self._by_rate_with_streams(predictor), mb,
                                    running_micro_batch)

    def _by_rate_with_streams(self, predictor) -> list[tuple[float | None, float]]:
        """Harli's (share, decode slowdown) candidates by finetune rate, plain streams (None) among them
        when the interference table measured them."""
        order = self._candidates
        if order is None:
            shares: list[float | None] = list(SHARES)
            try:
                predictor.decode_slowdown(None)
                shares.append(None)
            except TableError:
                pass
            order = self._candidates = ranked_by_rate(predictor, shares)
        return order
