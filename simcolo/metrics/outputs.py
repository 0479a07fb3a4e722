"""A run's result and its files, the same for a simulation and a live replay: one summary, one writer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simcolo.metrics.io import atomic_path, write_json
from simcolo.metrics.records import RequestSink
from simcolo.metrics.summary import serving_summary
from simcolo.metrics.training_summary import slo_multiples, training_summary


@dataclass
class RunResult:
    summary: dict[str, Any]
    sink: RequestSink
    timeline: pd.DataFrame
    system: Any                    # the ServingSystem
    wall_s: float                  # wall time of the run (not in the summary: results are deterministic)
    out_dir: Path | None = None
    plots: list[Path] = field(default_factory=list)
    training: pd.DataFrame | None = None    # one row per optimizer step (runs with training)
    backend: Any = None

    def requests(self) -> pd.DataFrame:
        return self.sink.read().to_pandas()


def run_summary(run, backend, sink, itl, workload) -> dict:
    """Every summary key both backends report (a replay adds its ``replay_*`` keys)."""
    summary = serving_summary(sink, itl, run.slo.ttft_s, run.slo.tpot_s)
    summary.update(_cluster_summary(backend, summary["duration_s"]))
    summary.update({f"status_{k}": v for k, v in sorted(sink.status_counts.items())})
    summary.update(slo_multiples(sink, backend.cost))
    summary.update(training_summary(backend, sink, summary["duration_s"], summary["num_finished"]))
    summary.update(workload.stats.as_dict())
    cost = backend.cost
    summary.update({"cost_source": cost.metadata.get("source", "unknown"),
                    "cost_off_grid_queries": int(sum(n for axes in cost.off_grid.values() for n in axes.values())),
                    "cost_interference": backend.interference.method,
                    "cost_interference_scale": backend.interference.scale,
                    "policy": run.policy_name, "model": run.model.name, "gpu": run.gpu.name, "seed": run.seed})
    return summary


def _cluster_summary(backend, duration_s: float) -> dict[str, float]:
    system = backend.system
    busy = [inst.busy_s for inst in system.instances]
    mem = [g.memory.peak for g in backend.cluster.gpus if g.memory.peak > 0]
    return {
        "num_instances": len(system.instances),
        "num_gpus": len(backend.cluster.gpus),
        "kv_blocks_per_instance": system.kv_budget.num_blocks,
        "gpu_busy_frac_mean": float(np.mean(busy)) / duration_s if busy else 0.0,
        "gpu_busy_frac_max": float(np.max(busy)) / duration_s if busy else 0.0,
        "iterations": int(sum(inst.iterations for inst in system.instances)),
        "gpu_memory_reserved_frac": float(np.max(mem)) / backend.cluster.spec.memory_bytes if mem else 0.0,
    }


def write_outputs(out_dir: Path, plots_on: bool, result: RunResult, label: str,
                  tables: dict | None = None) -> list[Path]:
    """A run's files beside ``requests.parquet`` (written by its sink): ``gpus.parquet``, ``training.parquet``
    (runs with training), any further ``tables`` (name -> DataFrame), ``plots/`` (``metrics.plots``) and, last,
    ``summary.json``, whose presence means the run completed. Returns the plots written."""
    frames = {"gpus": result.timeline, "training": result.training, **(tables or {})}
    for name, frame in frames.items():
        if frame is not None:
            with atomic_path(out_dir / f"{name}.parquet") as tmp:
                # dictionary encoding for the label columns only: on times and counters it costs more than
                # it saves (a finetune week's training.parquet: millions of rows, 2x the write time)
                labels = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
                frame.to_parquet(tmp, index=False, use_dictionary=labels)
    plots = []
    if plots_on:
        from simcolo.metrics.plots import write_plots

        columns = ["status", "ttft_s", "tpot_s", "e2el_s", "finish_s", "output_tokens"]
        plots = write_plots(result.sink.read(columns).to_pandas(), result.timeline, out_dir / "plots", label,
                            training=result.training)
    write_json(out_dir / "summary.json", result.summary)
    return plots
