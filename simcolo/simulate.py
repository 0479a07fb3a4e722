"""One simulation run: build the parts from a config, run the SimPy model, write the outputs.

A routing policy gets the serving system alone; a co-location policy gets the layout it asks for
from ``simcolo.colocation`` (training beside serving), and the run then ends when serving does.

This is the library entry point (tests and notebooks call ``simulate``); ``simcolo.cli`` wraps it
in a Hydra app.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from simcolo.costs import cost_model_for
from simcolo.errors import ConfigError
from simcolo.hardware.cluster import Cluster
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.metrics.io import atomic_path, write_json
from simcolo.metrics.itl import ITLHistogram
from simcolo.metrics.records import RequestSink
from simcolo.metrics.summary import serving_summary
from simcolo.metrics.timeline import TimelineSampler
from simcolo.metrics.training_summary import slo_multiples, training_summary
from simcolo.policies import make_policy
from simcolo.serving.arrivals import ArrivalFeed
from simcolo.serving.batch_scheduler import BatchingConfig
from simcolo.serving.system import ServingLayout, ServingSystem
from simcolo.specs import gpu_spec_from_mapping, model_spec_from_mapping
from simcolo.workload import build_workload


@dataclass
class RunResult:
    summary: dict[str, Any]
    sink: RequestSink
    timeline: pd.DataFrame
    system: ServingSystem
    wall_s: float                  # wall time of the simulation (not in the summary: results are deterministic)
    out_dir: Path | None = None
    plots: list[Path] = field(default_factory=list)
    training: pd.DataFrame | None = None    # one row per optimizer step (co-located runs)
    colocation: Any = None

    def requests(self) -> pd.DataFrame:
        return self.sink.read().to_pandas()


def batching_from_cfg(cfg) -> BatchingConfig:
    return BatchingConfig(max_num_seqs=int(cfg["max_num_seqs"]), max_batched_tokens=int(cfg["max_batched_tokens"]),
                          block_size=int(cfg["block_size"]), chunked_prefill=bool(cfg["chunked_prefill"]),
                          watermark=float(cfg["watermark"]), fast_advance=bool(cfg["fast_advance"]))


def simulate(cfg, out_dir: str | Path | None = None, progress: bool = False) -> RunResult:
    """Run the simulation described by ``cfg`` (the composed Hydra config).

    With ``out_dir`` it writes ``requests.parquet``, ``gpus.parquet``, ``summary.json`` and
    ``plots/*.png`` there (each atomically; on error nothing that looks finished is left).
    ``progress`` shows a tqdm bar of finished requests and simulated time.
    """
    wall0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    model = model_spec_from_mapping(cfg["model"], "model")
    gpu = gpu_spec_from_mapping(cfg["gpu"], "gpu")
    layout = ServingLayout.from_cfg(cfg["serving"])
    batching = batching_from_cfg(cfg["serving"])
    seed = int(cfg["seed"])
    policy = make_policy(cfg["policy"], np.random.default_rng([seed, 2]))
    # A co-location policy with training=none serves alone on the layout it would train on.
    colocated = policy.layout != "serving"
    if policy.layout == "serving" and cfg["training"]["kind"] != "none":
        raise ConfigError(f"policy '{policy.name}' only routes requests; training={cfg['training']['kind']} needs a "
                          f"co-location policy: isolated, mix_rr, mix_luf, mix_random, lemix (full) or harli, "
                          f"static_share, flexllm (lora)")
    if not colocated:
        layout.kv_budget(model, gpu, batching)  # fail early, before anything else, if the model cannot fit
        cost = cost_model_for(gpu.name, model.name, layout.tp, cfg["costs"]["path"], cfg["costs"]["tables_root"])
    rng = np.random.default_rng(seed)
    workload = build_workload(cfg["workload"], max_context_len=model.max_context_len, rng=rng)

    env = SimEnvironment()
    c = cfg["cluster"]
    cluster = Cluster(env, gpu, int(c["num_nodes"]), int(c["gpus_per_node"]),
                      float(c["network_bandwidth_bytes_per_s"]), float(c["network_latency_s"]),
                      float(c["nvlink_latency_s"]))
    sink = RequestSink(out_dir / "requests.parquet" if out_dir else None)
    itl = ITLHistogram()
    colo = None
    if colocated:
        from simcolo.colocation.backend import Colocation

        def on_done(r) -> None:
            sink(r)
            colo.on_request_finished(r)
            if finished() and not stop.triggered:
                stop.succeed()

        colo = Colocation(env, cluster, model, gpu, cfg, policy, layout, batching, on_done, itl, seed)
        system, cost = colo.system, colo.cost
        stop = env.event()   # training never runs dry: the run ends when serving does

        def dispatch(r) -> None:
            colo.on_request_arrival()
            system.dispatch(r)
        arrivals = ArrivalFeed(env, workload, dispatch)
    else:
        system = ServingSystem(env, cluster, model, cost, layout, batching, policy, sink, itl)
        arrivals = ArrivalFeed(env, workload, system.dispatch)
        stop = None

    def finished() -> bool:
        return arrivals.done and system.done == system.arrived

    bar = tqdm(unit="req", desc="simulating", disable=not progress, mininterval=0.5, leave=False)

    def on_tick(now: float) -> None:
        bar.update(system.done - bar.n)
        bar.set_postfix_str(f"t={now:,.0f}s", refresh=False)

    sampler = TimelineSampler(env, system, float(cfg["metrics"]["timeline_interval_s"]), finished,
                              on_tick if progress else None)
    max_time = cfg["sim"]["max_time_s"]
    try:
        if stop is not None:
            if max_time is not None:
                At(env, float(max_time)).callbacks.append(lambda _ev: stop.triggered or stop.succeed())
            if finished():
                stop.succeed()
            env.run(until=stop)
        else:
            env.run(until=None if max_time is None else float(max_time))
        if not finished():
            for r in system.in_flight():
                r.status = "unfinished_at_end"
                sink(r)
            for r in arrivals.remaining():  # the rest of the stream: it arrives after the end
                r.status = "not_arrived_before_end"
                sink(r)
        sink.close()
    except BaseException:
        sink.abandon()
        raise
    finally:
        bar.close()
    sim_wall_s = time.perf_counter() - wall0

    slo = cfg["slo"]
    summary = serving_summary(sink, itl, float(slo["ttft_s"]), float(slo["tpot_s"]))
    summary.update(_cluster_summary(system, summary["duration_s"]))
    summary.update({f"status_{k}": v for k, v in sorted(sink.status_counts.items())})
    summary.update(slo_multiples(sink, cost))
    if colo is not None:
        colo.close(env.now)
    summary.update(training_summary(colo, system, sink, summary["duration_s"], summary["num_finished"]))
    summary.update(workload.stats.as_dict())
    summary.update({"cost_source": cost.metadata.get("source", "unknown"),
                    "cost_off_grid_queries": int(sum(n for axes in cost.off_grid.values() for n in axes.values())),
                    "cost_interference": colo.interference.method if colo is not None else "none",
                    "policy": cfg["policy"]["name"], "model": model.name, "gpu": gpu.name,
                    "seed": int(cfg["seed"])})
    timeline = sampler.frame()
    training = training_frame(colo)
    result = RunResult(summary, sink, timeline, system, sim_wall_s, out_dir, training=training, colocation=colo)
    if out_dir is not None:
        result.plots = write_outputs(out_dir, cfg, result, f"({model.name}, {cfg['policy']['name']})")
    return result


def write_outputs(out_dir: Path, cfg, result: RunResult, label: str, tables: dict | None = None) -> list[Path]:
    """A run's files beside ``requests.parquet`` (written by its sink): ``gpus.parquet``, ``training.parquet``
    (co-located runs), any further ``tables`` (name -> DataFrame), ``plots/`` (``metrics.plots``) and, last,
    ``summary.json``, whose presence means the run completed. Returns the plots written."""
    frames = {"gpus": result.timeline, "training": result.training, **(tables or {})}
    for name, frame in frames.items():
        if frame is not None:
            with atomic_path(out_dir / f"{name}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
    plots = []
    if cfg["metrics"]["plots"]:
        from simcolo.metrics.plots import write_plots

        columns = ["status", "ttft_s", "tpot_s", "e2el_s", "finish_s", "output_tokens"]
        plots = write_plots(result.sink.read(columns).to_pandas(), result.timeline, out_dir / "plots", label)
    write_json(out_dir / "summary.json", result.summary)
    return plots


def training_frame(colo) -> pd.DataFrame | None:
    if colo is None or not colo.training_on:
        return None
    from simcolo.colocation.backend import TrainingRecords

    df = pd.DataFrame(colo.records.rows, columns=list(TrainingRecords.COLUMNS))
    return df.astype({"trainer": "int64", "version": "int64", "start_s": "float64", "end_s": "float64",
                      "tasks": "int64", "tokens": "int64"})


def _cluster_summary(system: ServingSystem, duration_s: float) -> dict[str, float]:
    busy = [inst.busy_s for inst in system.instances]
    mem = [g.memory.peak for g in system.cluster.gpus if g.memory.peak > 0]
    return {
        "num_instances": len(system.instances),
        "num_gpus": len(system.cluster.gpus),
        "kv_blocks_per_instance": system.kv_budget.num_blocks,
        "gpu_busy_frac_mean": float(np.mean(busy)) / duration_s if busy else 0.0,
        "gpu_busy_frac_max": float(np.max(busy)) / duration_s if busy else 0.0,
        "iterations": int(sum(inst.iterations for inst in system.instances)),
        "gpu_memory_reserved_frac": float(np.max(mem)) / system.cluster.spec.memory_bytes if mem else 0.0,
    }
