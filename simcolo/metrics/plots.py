"""PNG plots of a run: latency CDFs, throughput, queue length, GPU utilisation and memory over time and,
when the run trained, its training progress (``training.png``).

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
    fig.tight_layout()      # the suptitle clear of the panels' titles
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_plots(requests: pd.DataFrame, timeline: pd.DataFrame, out_dir: Path, label: str = "",
                training: pd.DataFrame | None = None) -> list[Path]:
    """Write the run's plots into ``out_dir`` (its ``plots/``); returns their paths.

    ``training``: the run's training records (one row per optimizer step); when not given, the run
    directory's ``training.parquet`` (``out_dir``'s parent; :func:`~simcolo.metrics.outputs.write_outputs`
    writes it before the plots) is read if it exists. ``training.png`` is drawn when there is at least
    one optimizer step.
    """
    plt = _figure()
    out_dir.mkdir(parents=True, exist_ok=True)
    done = requests[requests["status"] == "finished"]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes, ("ttft_s", "tpot_s", "e2el_s")):
        values = done[name].dropna().to_numpy()
        if values.size:
            ax.plot(np.quantile(values, _QUANTILES), _QUANTILES)
        ax.set_xlabel(f"{name[:-2].upper()} (s)   ← lower is better")
        ax.set_ylabel("share of finished requests at or below")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs {label}".strip())
    paths.append(out_dir / "latency_cdf.png")
    _save(fig, paths[-1])
    plt.close(fig)

    fig = throughput_figure(plt, done, label)
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
    ax.set_xlabel("simulated time (s)")
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
    ax_u.set_xlabel("simulated time (s)")
    ax_u.set_ylabel("busy fraction")
    ax_u.set_ylim(-0.02, 1.02)
    ax_m.set_xlabel("simulated time (s)")
    ax_m.set_ylabel("memory in use / capacity")
    ax_m.set_ylim(0, 1.02)
    for ax in (ax_u, ax_m):
        ax.grid(alpha=0.3)
    fig.suptitle(f"GPU utilisation and memory over time {label}".strip())
    paths.append(out_dir / "gpu_timeline.png")
    _save(fig, paths[-1])
    plt.close(fig)

    if training is None:
        file = Path(out_dir).parent / "training.parquet"
        training = pd.read_parquet(file) if file.is_file() else None
    if training is not None and len(training):
        end = float(done["finish_s"].max()) if len(done) else None
        fig = training_figure(plt, training, label, end)
        paths.append(out_dir / "training.png")
        _save(fig, paths[-1])
        plt.close(fig)
    return paths


def throughput_figure(plt, done: pd.DataFrame, label: str = ""):
    """Finished requests/s (left axis) and output tokens/s (right axis) over simulated time, in bins of
    about a second (at most 200), one legend naming both curves and their axes."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if len(done):
        span = float(done["finish_s"].max()) or 1.0
        bins = np.linspace(0.0, span, min(200, max(2, int(span))) + 1)
        width = bins[1] - bins[0]
        req, _ = np.histogram(done["finish_s"], bins)
        tok, _ = np.histogram(done["finish_s"], bins, weights=done["output_tokens"])
        lines = ax.plot(bins[:-1], req / width, color="tab:blue", label="finished requests/s (left axis)")
        ax2 = ax.twinx()
        lines += ax2.plot(bins[:-1], tok / width, color="tab:orange", label="output tokens/s (right axis)")
        ax2.set_ylabel("output tokens/s (tok/s)", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
        ax2.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
        ax.tick_params(axis="y", colors="tab:blue")
        # one legend for both axes, above the curves' highest point
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left", framealpha=0.9)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
        ax2.set_ylim(top=ax2.get_ylim()[1] * 1.25)
        ax.set_xlabel(f"simulated time (s); rates over {width:.3g} s bins")
    else:
        ax.set_xlabel("simulated time (s)")
        ax.text(0.5, 0.5, "no finished requests", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylabel("finished requests/s (req/s)", color="tab:blue")
    ax.grid(alpha=0.3)
    ax.set_title(f"Throughput over time {label}".strip())
    return fig


def training_figure(plt, training: pd.DataFrame, label: str = "", end_s: float | None = None):
    """Training progress of one run: training tokens (all trainers) and each trainer's model version
    (optimizer steps in its weights) over simulated time, from the run's training records."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from simcolo.metrics.comparison_plots import training_curve

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 3.6))
    curve = training_curve(training)
    t, tok = np.r_[0.0, curve["time_s"].to_numpy()], np.r_[0.0, curve["tokens"].to_numpy()]
    if end_s is not None and end_s > t[-1]:
        t, tok = np.r_[t, end_s], np.r_[tok, tok[-1]]
    ax_t.plot(t, tok, drawstyle="steps-post", color="tab:green", label="all trainers")
    ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax_t.set_ylabel("training tokens (cumulative)")
    ax_t.set_title(f"{int(tok[-1]):,} tokens in {len(curve)} optimizer steps")
    trainers = sorted(training["trainer"].unique())
    for trainer in trainers:
        rows = training[training["trainer"] == trainer].sort_values("end_s", kind="stable")
        tv = np.r_[0.0, rows["end_s"].to_numpy(float)]
        v = np.r_[0.0, rows["version"].to_numpy(float)]
        if end_s is not None and end_s > tv[-1]:
            tv, v = np.r_[tv, end_s], np.r_[v, v[-1]]
        ax_v.plot(tv, v, drawstyle="steps-post", lw=1.0, label=f"trainer {trainer}")
    ax_v.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_v.set_ylabel("model version (optimizer steps)")
    ax_v.set_title(f"model version per trainer ({len(trainers)} trainer{'s' if len(trainers) != 1 else ''})")
    if len(trainers) <= 8:
        ax_v.legend(fontsize=7, ncol=2, loc="upper left")
    for ax in (ax_t, ax_v):
        ax.set_xlabel("simulated time (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Training progress {label}".strip())
    return fig
