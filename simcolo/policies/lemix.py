"""LeMix (Li et al., arXiv 2507.21276, RTSS'25): prediction-driven placement of inference and training
tasks on co-located pipelines.

For a task and each node, predict per-stage start and finish times from the node's placed-but-undone
training work (earlier samples' backward passes included, ``stage_backlogs_s``), giving a predicted
response time RT and a predicted idle time II (the gaps a stage sits idle waiting for this task), and
score the node ``(IP + beta * LC) / (alpha * RT)`` with ``IP = -max(II / S - da, tau)`` (``da``: time since
the node's last placement) and ``LC`` the Gaussian density of the task's length under the lengths of that
type already placed on the node. The highest score wins (ties: lowest index).

Decisions where the paper leaves room (ours):

* Inference requests are served by the node's continuous-batching engine, which co-runs with
  training (it does not queue behind training kernels). A request's RT is its predicted time to first
  token (the wait for queued prompts plus its prefill) plus ``expected_output_tokens`` decode
  iterations at the node's batch with it added, all divided by the node's current serving rate; its
  II is 0. The score prefers the larger RT (it packs work onto busy nodes), so a request only goes to
  a node where it is *feasible*: no queue blocked behind a full batch or KV cache (the wait would be
  unpredictable), predicted TTFT within the TTFT SLO and predicted decode iteration within
  ``decode_slo_fraction`` x the TPOT SLO; if no node is feasible, to the smallest RT.
* A request's length is its prompt length (output lengths are unknown at arrival); a training task's
  is its token count. A node with fewer than two tasks of the type uses std 1 token, mean = the task's
  own length (LC is the density's peak).
* A training task's RT is the predicted completion of its forward through the pipeline (blocked by
  the backlog on each stage, earlier tasks' backward passes included): the SLO it is held to is the
  unloaded pipeline forward time, so RT is measured on the same thing. Tasks whose RT exceeds
  ``defer_factor`` x that SLO are deferred and offered again whenever a training task completes.
* Asynchronous release and the memory gate come from the config (``release``, ``memory_threshold``).
"""
from __future__ import annotations

import math

from simcolo.policies.base import PipelinePolicy, knobs


def gaussian_density(x: float, mean: float, std: float) -> float:
    std = max(std, 1.0)
    z = (x - mean) / std
    return math.exp(-0.5 * z * z) / (std * math.sqrt(2.0 * math.pi))


def lemix_score(rt: float, ii: float, num_stages: int, since_arrival_s: float, lc: float,
                alpha: float, beta: float, tau: float) -> float:
    ip = -max(ii / num_stages - since_arrival_s, tau)
    return (ip + beta * lc) / (alpha * rt)


def predict_training(forward: list[float], backlog: list[float]) -> tuple[float, float]:
    """(RT, II) of a training task on a node whose stages have ``backlog`` seconds of work ahead of it
    (earlier tasks' forwards and backward passes): its forward goes through the stages, each starting
    when the task arrives there and the stage is free. RT is when its forward completes (the response
    the SLO is defined on); II sums the gaps a stage idles waiting for the task."""
    t, ii = 0.0, 0.0
    for s, f in enumerate(forward):
        free = backlog[s]
        if s > 0 and t > free:
            ii += t - free
        t = max(t, free) + f
    return t, ii


class LeMix(PipelinePolicy):
    name = "lemix"
    config_keys = ("alpha", "beta", "tau", "defer_factor", "memory_threshold", "release", "expected_output_tokens",
                   "decode_slo_fraction")

    def __init__(self, cfg, rng=None):
        super().__init__(cfg, rng)
        g = knobs(cfg)
        self.alpha, self.beta, self.tau = (g.float(k, ge=0) for k in ("alpha", "beta", "tau"))
        self.defer_factor = g.float("defer_factor", gt=0)
        self.expected_output_tokens = g.int("expected_output_tokens", min=1)
        self.decode_slo_fraction = g.float("decode_slo_fraction", gt=0)
        self.release = g.choice("release", ("async", "sync"))
        self.memory_threshold = g.fraction("memory_threshold", "(0, 1]", optional=True)
        self.deferred = 0

    def _lc(self, node, length: float, training: bool) -> float:
        n, mean, std = node.length_stats(training)
        if n < 2:
            return gaussian_density(length, length, 1.0)
        return gaussian_density(length, mean, std)

    def route(self, request, instances, now):
        best = fallback = None
        pred = self.predictor
        prompt = request.prompt_tokens
        prefill = pred.request_prefill_s(prompt)
        tpot_limit = self.decode_slo_fraction * pred.tpot_slo_s
        for i, node in enumerate(instances):
            rate = node.serving_rate()
            ttft = (node.serving_wait_s(now) + prefill) / rate
            batch, kv = node.decode_load()
            step = pred.decode_solo_s(batch + 1, kv + prompt) / rate
            rt = ttft + self.expected_output_tokens * step
            if fallback is None or rt < fallback[0]:
                fallback = (rt, i)
            if ttft > pred.ttft_slo_s or step > tpot_limit or node.queue_blocked():
                continue
            score = lemix_score(rt, 0.0, node.num_stages, now - node.last_arrival_s,
                                self._lc(node, request.prompt_tokens, False), self.alpha, self.beta, self.tau)
            if best is None or score > best[0]:
                best = (score, i)
        return (best or fallback)[1]

    def place_training(self, task, nodes, predictor, now):
        best = None
        for i, node in enumerate(nodes):
            S = node.num_stages
            fwd = predictor.task_forward_s(S)
            rt, ii = predict_training(fwd, node.stage_backlogs_s())
            if rt > self.defer_factor * sum(fwd):
                continue
            score = lemix_score(rt, ii, S, now - node.last_arrival_s, self._lc(node, task.tokens, True),
                                self.alpha, self.beta, self.tau)
            if best is None or score > best[0]:
                best = (score, i)
        if best is None:
            self.deferred += 1
            return None
        return best[1]
