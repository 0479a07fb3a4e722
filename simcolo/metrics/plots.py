"""PNG plots of a run: latency CDFs, throughput, queue length, and GPU utilisation and memory over time.

Each curve is reduced to at most a few thousand points first, so plotting stays a small part of a
run's time however many requests it had.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simcolo.metrics.io import atomic_path

_QUANTILES = np.linspace(0, 1, 1001)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_plots(requests: pd.DataFrame, timeline: pd.DataFrame, out_dir: Path, label: str = "") -> list[Path]:
    plt = _figure()
    out_dir.mkdir(parents=True, exist_ok=True)
    done = requests[requests["status"] == "finished"]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes, ("ttft_s", "tpot_s", "e2el_s")):
        values = done[name].dropna().to_numpy()
        if values.size:
            ax.plot(np.quantile(values, _QUANTILES), _QUANTILES)
        ax.set_xlabel(f"{name[:-2].upper()} (s)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs {label}".strip())
    paths.append(out_dir / "latency_cdf.png")
    _save(fig, paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    if len(done):
        span = float(done["finish_s"].max()) or 1.0
        bins = np.linspace(0.0, span, min(200, max(2, int(span))) + 1)
        width = bins[1] - bins[0]
        req, _ = np.histogram(done["finish_s"], bins)
        tok, _ = np.histogram(done["finish_s"], bins, weights=done["output_tokens"])
        ax.plot(bins[:-1], req / width, label="requests/s")
        ax2 = ax.twinx()
        ax2.plot(bins[:-1], tok / width, color="tab:orange", label="output tokens/s")
        ax2.set_ylabel("output tokens/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("finished requests/s")
    ax.set_title(f"Throughput over time {label}".strip())
    paths.append(out_dir / "throughput.png")
    _save(fig, paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    if len(timeline):
        per_inst = timeline.drop_duplicates(["time_s", "instance"])
        waiting = per_inst.groupby("time_s")["waiting"].sum()
        running = per_inst.groupby("time_s")["running"].sum()
        ax.plot(waiting.index, waiting.to_numpy(), label="waiting")
        ax.plot(running.index, running.to_numpy(), label="running")
        ax.legend()
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests")
    ax.set_title(f"Queue length over time {label}".strip())
    paths.append(out_dir / "queue_length.png")
    _save(fig, paths[-1])
    plt.close(fig)

    fig, (ax_u, ax_m) = plt.subplots(1, 2, figsize=(13, 3.6))
    if len(timeline):
        per_gpu = timeline.drop_duplicates(["time_s", "gpu"])
        for gpu, rows in per_gpu.groupby("gpu"):
            ax_u.plot(rows["time_s"], rows["utilization"], lw=0.8, label=f"GPU {gpu}")
            ax_m.plot(rows["time_s"], rows["memory_used_bytes"] / rows["memory_capacity_bytes"], lw=0.8)
        if per_gpu["gpu"].nunique() <= 8:
            ax_u.legend(fontsize=7, ncol=2)
    ax_u.set_xlabel("time (s)")
    ax_u.set_ylabel("busy fraction")
    ax_u.set_ylim(-0.02, 1.02)
    ax_m.set_xlabel("time (s)")
    ax_m.set_ylabel("memory in use / capacity")
    ax_m.set_ylim(0, 1.02)
    for ax in (ax_u, ax_m):
        ax.grid(alpha=0.3)
    fig.suptitle(f"GPU utilisation and memory over time {label}".strip())
    paths.append(out_dir / "gpu_timeline.png")
    _save(fig, paths[-1])
    plt.close(fig)
    return paths
