"""Summary keys that training adds: progress, freshness, pipeline bubbles, LeMix's throughput, GPU use.

Definitions:

* ``train_tokens_per_s`` / ``train_samples_per_s``: tokens / sequences of finished training tasks per
  second of the run (the serving span: first arrival to last completion).
* ``optimizer_steps``: optimizer steps over all trainers (each co-located node and each finetuner
  steps its own replica or adapter; an isolated data-parallel step counts once).
* ``inference_loss_mean``: mean over finished requests of loss(version that served it), from the
  learning curve (``training.learning_curve``).
* ``bubble_rate``: 1 - training kernel time / (stages x time the pipeline had work in flight), over
  all pipelines (NaN where there is no pipeline).
* ``lemix_throughput_tasks_per_s``: (finished requests + finished training tasks) / summed active
  time of the nodes (a node is a serving instance's or a training replica's GPU group; its active time
  is the busiest of its GPUs' busy time) — LeMix's definition, beside the conventional ones.
* ``gpu_utilization_mean``: mean over GPUs of the fraction of the run they had anything running.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def unloaded_latency_s(cost, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """End-to-end latency of each request alone on an idle instance: its prefill, then ``output - 1``
    decode iterations of batch 1 at the mean KV length (prompt + output / 2)."""
    uniq, inverse = np.unique(prompt, return_inverse=True)
    prefill = np.array([cost.prefill_s(int(p), 1) for p in uniq])[inverse]
    decode = cost.decode_s_many(1, prompt + output / 2.0)
    return prefill + np.maximum(output - 1, 0) * decode


def slo_multiples(sink, cost, multiples=(1, 5, 10)) -> dict[str, float]:
    """``slo_attainment_<k>x``: the share of requests that finished within k x their unloaded latency.
    Columns are read one at a time and dropped when used (bounded memory for huge runs)."""
    finished = sink.status_is("finished")
    n = len(finished)
    if not n:
        return {f"slo_attainment_{k}x": math.nan for k in multiples}
    prompt = sink.column("prompt_tokens").astype(np.float64)
    base = unloaded_latency_s(cost, prompt, sink.column("output_tokens").astype(np.float64))
    del prompt
    ratio = sink.column("e2el_s") / base
    del base
    ratio[~finished] = np.inf
    return {f"slo_attainment_{k}x": float(np.count_nonzero(ratio <= k * (1 + 1e-9))) / n for k in multiples}


@dataclass
class TrainerReport:
    """What one trainer (a simulated or live pipeline, isolated trainer or finetuner) did in a run."""
    sequences_done: int = 0          # training sequences finished
    tokens_done: int = 0
    work_s: float = 0.0              # training kernel time summed over its stages (for the bubble rate)
    span_s: float = 0.0              # stages x time it had work in flight (0: not a pipeline)
    counters: dict = field(default_factory=dict)   # its own summary keys (summed over trainers)


def training_summary(backend, sink, duration_s: float, num_finished: int) -> dict:
    """Training keys of a run, the same for both backends. ``backend`` gives ``layout`` (its plan's kind),
    ``training`` (the typed config or None), ``trainers`` (each with ``report()``), ``records`` (one row
    per optimizer step), ``tasks_done``, ``stream``, ``learning_curve``, ``gpu_busy_s()`` (per GPU),
    ``train_busy_s()`` (per GPU), ``node_groups()`` (GPU groups that serve or train) and
    ``training_parts`` (the layout's shared parts -- placement, weight sync, finetune pool -- each with
    ``counters()``, its own summary keys)."""
    busy = backend.gpu_busy_s()
    d = duration_s
    if backend.training is None:
        return {"training_kind": "none", "layout": backend.layout,
                "gpu_utilization_mean": float(np.mean(busy)) / d if busy and d > 0 else 0.0}
    reports = [t.report() for t in backend.trainers]
    out: dict = {"training_kind": backend.training.kind, "layout": backend.layout,
                 "train_tasks_done": backend.tasks_done,
                 "train_tokens_per_s": sum(r.tokens_done for r in reports) / d if d > 0 else math.nan,
                 "train_samples_per_s": sum(r.sequences_done for r in reports) / d if d > 0 else math.nan,
                 "optimizer_steps": len(backend.records.rows), "train_tasks_created": backend.stream.created}
    finished = sink.status_is("finished")
    versions = sink.column("model_version")[finished]
    out["inference_loss_mean"] = float(backend.learning_curve.loss(versions).mean()) if versions.size else math.nan
    out["model_version_mean"] = float(versions.mean()) if versions.size else math.nan
    span = sum(r.span_s for r in reports)
    out["bubble_rate"] = 1.0 - sum(r.work_s for r in reports) / span if span > 0 else math.nan
    out["gpu_utilization_mean"] = float(np.mean(busy)) / d if d > 0 else math.nan
    out["gpu_utilization_max"] = float(np.max(busy)) / d if d > 0 else math.nan
    active = sum(max(busy[g] for g in grp) for grp in backend.node_groups())
    out["lemix_throughput_tasks_per_s"] = (num_finished + backend.tasks_done) / active if active > 0 else math.nan
    out["train_busy_frac_mean"] = float(np.mean(backend.train_busy_s())) / d if d > 0 else math.nan
    counters: dict = {}
    for c in [r.counters for r in reports] + [part.counters() for part in backend.training_parts]:
        for k, v in c.items():
            counters[k] = counters.get(k, 0) + v
    out.update(counters)
    return out
