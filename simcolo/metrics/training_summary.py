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

import numpy as np


def gpu_busy_s(system, colo) -> list[float]:
    """Busy seconds per GPU: the shared compute's clock where co-location attached it, else the
    instance's own busy time (serving-only GPUs never go through the shared compute)."""
    busy = [g.compute.busy_s for g in system.cluster.gpus]
    for inst in system.instances:
        if not inst.attached:
            for g in inst.gpus:
                busy[g] = max(busy[g], inst.busy_s)
    return busy


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


def training_summary(colo, system, sink, duration_s: float, num_finished: int) -> dict:
    if colo is None or not colo.training_on:
        busy = gpu_busy_s(system, None)
        return {"training_kind": "none", "layout": colo.kind if colo is not None else "serving",
                "gpu_utilization_mean": float(np.mean(busy)) / duration_s if busy else 0.0}
    d = duration_s
    out: dict = {"training_kind": str(colo.cfg["training"]["kind"]), "layout": colo.kind}
    sequences = colo.tasks_done * colo.micro_batch
    if colo.kind == "finetune":
        sequences = sum(ft.sequences_done for ft in colo.finetuners)
        tokens = sum(ft.tokens_done for ft in colo.finetuners)
    else:
        tokens = colo.tokens_done
    out.update({"train_tasks_done": colo.tasks_done, "train_tokens_per_s": tokens / d,
                "train_samples_per_s": sequences / d, "optimizer_steps": len(colo.records.rows),
                "train_tasks_created": colo.stream.created})
    finished = sink.status_is("finished")
    versions = sink.column("model_version")[finished]
    out["inference_loss_mean"] = float(colo.learning_curve.loss(versions).mean()) if versions.size else math.nan
    out["model_version_mean"] = float(versions.mean()) if versions.size else math.nan
    # pipeline bubbles
    if colo.kind == "isolated":
        t = colo.trainer
        out["bubble_rate"] = 1.0 - t.stage_busy_s / t.stage_span_s if t.stage_span_s > 0 else math.nan
    elif colo.kind == "pipelines":
        work = sum(sum(p.train_busy_s) for p in colo.trainers)
        span = sum(p.S * p.active_s for p in colo.trainers)
        out["bubble_rate"] = 1.0 - work / span if span > 0 else math.nan
    else:
        out["bubble_rate"] = math.nan
    # GPU use and LeMix's throughput
    busy = gpu_busy_s(system, colo)
    out["gpu_utilization_mean"] = float(np.mean(busy)) / d
    out["gpu_utilization_max"] = float(np.max(busy)) / d
    groups = [inst.gpus for inst in system.instances] + colo.train_groups
    active = sum(max(busy[g] for g in grp) for grp in groups)
    out["lemix_throughput_tasks_per_s"] = (num_finished + colo.tasks_done) / active if active > 0 else math.nan
    out["train_busy_frac_mean"] = float(np.mean([g.compute.train_busy_s for g in system.cluster.gpus])) / d
    if colo.kind == "pipelines":
        out["train_deferred_tasks"] = len(colo.deferred)
        out["train_queued_tasks"] = sum(p.queued for p in colo.trainers)
    if colo.kind == "isolated":
        out["weight_syncs"] = colo.weight_sync.syncs
        out["train_queued_tasks"] = len(colo.trainer.queue)
    if colo.kind == "finetune":
        out["finetune_aborted_microbatches"] = sum(ft.aborted_microbatches for ft in colo.finetuners)
        out["finetune_microbatches"] = sum(ft.micro_batches for ft in colo.finetuners)
        out["train_queued_sequences"] = colo.pool.available
        out["decode_waits_on_finetune_blocks"] = sum(i.waits_on_lent_blocks for i in system.decoders)
    return out
