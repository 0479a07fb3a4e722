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
* ``train_job``: ``full`` | ``lora`` | ``none`` -- which job trained (``none``: serving alone).
* ``train_flops_per_s``: training work in a job-neutral unit, model FLOPs per second of the run
  (:func:`train_flops_per_token` x ``train_tokens_per_s``): full-parameter training and LoRA finetuning,
  whatever their sequence lengths and batch sizes, compare in one number (0 for serving alone).
* ``train_mfu``: model FLOPs utilisation of the GPUs that train, ``train_flops_per_s`` / (their count x
  the GPU's ``peak_bf16_flops``). The GPUs that train: isolated's training replicas, every GPU of a
  co-located pipelines layout (they serve too), the decode GPUs of a finetune layout (0 for serving alone).
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
    # only finished requests have a latency (a refused one may not even fit the cost tables' grid)
    prompt = sink.column("prompt_tokens")[finished].astype(np.float64)
    base = unloaded_latency_s(cost, prompt, sink.column("output_tokens")[finished].astype(np.float64))
    del prompt
    ratio = sink.column("e2el_s")[finished] / base
    del base
    return {f"slo_attainment_{k}x": float(np.count_nonzero(ratio <= k * (1 + 1e-9))) / n for k in multiples}


def flops_params(model) -> int:
    """Weights that multiply an activation once per token: every decoder layer's projections (and its
    norms) plus the output projection (vocab x hidden, tied to the embedding or not). The input
    embedding is a table lookup and costs no FLOPs, so it is left out."""
    return model.num_layers * model.layer_params + model.vocab_size * model.hidden_size


def train_flops_per_token(model, job: str, rank: int = 0) -> float:
    """Model FLOPs that training spends per token, for ``job`` ``full`` | ``lora`` | ``none``.

    With N = :func:`flops_params` (a matrix of N weights costs 2N FLOPs per token -- a multiply and an
    add per weight -- in the forward, and the backward costs twice the forward: one matrix product for
    the gradient w.r.t. the layer's input and one for the gradient w.r.t. its weights):

    * ``full``: 2N forward + 4N backward = **6N** (the 6N rule of Kaplan et al. 2020, "Scaling Laws for
      Neural Language Models", sec. 2.1: C ~ 6 N per training token).
    * ``lora``: the frozen base runs its forward (2N) and back-propagates to its *inputs* (2N: every
      decoder layer holds adapters -- on q, k, v, o, ``simcolo.training.memory.lora_params`` -- so the
      gradient must reach the first layer), but computes no gradient w.r.t. its frozen weights (the 2N
      that full training spends there; Hu et al. 2021, "LoRA", sec. 4.2: no gradients or optimizer
      state for the frozen weights). The N_A = ``lora_params(model, rank)`` adapter weights are trained
      fully: 6 N_A. Total **4N + 6 N_A** (N_A is ~0.1 % of N at rank 16 on Llama-3-8B).
    * ``none``: 0.

    These are *model* FLOPs, the useful work (the convention of model FLOPs utilisation, Chowdhery et al.
    2022, "PaLM", appendix B): activation checkpointing's recomputed forward (2N more per token in
    hardware) is not counted, so a job is not credited for recomputing. Attention's score and value
    products (Kaplan et al.'s 2 x layers x context x hidden per token in the forward: about 7 % of 2N for
    Llama-3-8B at 4,096 tokens) are left out, as the 6N rule leaves them out.
    """
    if job == "none":
        return 0.0
    n = float(flops_params(model))
    if job == "full":
        return 6.0 * n
    if job == "lora":
        from simcolo.training.memory import lora_params

        return 4.0 * n + 6.0 * float(lora_params(model, rank))
    raise ValueError(f"unknown training job {job!r}; expected full, lora or none")


def training_gpus(plan) -> list[int]:
    """GPUs that train in a layout plan: isolated's training replicas, every GPU of a pipelines layout's
    nodes, the decode instances' GPUs of a finetune layout; none without training."""
    from simcolo.layout.plan import FinetunePlan, IsolatedTrainingPlan, NodeTrainingPlan

    trainer = plan.trainer
    if isinstance(trainer, IsolatedTrainingPlan):
        return sorted(g for grp in trainer.groups for g in grp)
    if isinstance(trainer, NodeTrainingPlan):
        return sorted(g for inst in plan.instances for g in inst.gpus)
    if isinstance(trainer, FinetunePlan):
        return sorted(g for i in trainer.decoders for g in plan.instances[i].gpus)
    return []


def training_work(backend, train_tokens_per_s: float) -> dict:
    """``train_job``, ``train_flops_per_s`` and ``train_mfu`` of a run (see the module docstring)."""
    t = backend.training
    if t is None:
        return {"train_job": "none", "train_flops_per_s": 0.0, "train_mfu": 0.0}
    flops = train_flops_per_token(backend.model, t.kind, getattr(t, "rank", 0)) * train_tokens_per_s
    peak = len(training_gpus(backend.plan)) * float(backend.run.gpu.peak_bf16_flops)
    return {"train_job": t.kind, "train_flops_per_s": flops, "train_mfu": flops / peak if peak > 0 else math.nan}


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
                "gpu_utilization_mean": float(np.mean(busy)) / d if busy and d > 0 else 0.0,
                **training_work(backend, 0.0)}
    reports = [t.report() for t in backend.trainers]
    out: dict = {"training_kind": backend.training.kind, "layout": backend.layout,
                 "train_tasks_done": backend.tasks_done,
                 "train_tokens_per_s": sum(r.tokens_done for r in reports) / d if d > 0 else math.nan,
                 "train_samples_per_s": sum(r.sequences_done for r in reports) / d if d > 0 else math.nan,
                 "optimizer_steps": len(backend.records), "train_tasks_created": backend.stream.created}
    out.update(training_work(backend, out["train_tokens_per_s"]))
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
