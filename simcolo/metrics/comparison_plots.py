"""Comparison plots of the runs of a multirun (one :func:`simcolo.metrics.comparison.load_runs` frame).

Each function draws one figure and returns it (a notebook shows it inline); with ``path`` it also
writes it there as PNG, atomically. Figures are built without pyplot, so nothing here changes the
matplotlib backend of the caller. Per-run files are read column by column, only what is drawn, and
each curve is reduced to at most ~1000 points.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from simcolo.metrics.io import atomic_path

_QUANTILES = np.linspace(0.0, 1.0, 1001)
_MAX_POINTS = 1000


def _figure(ncols: int = 1, width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols)
    return fig, axes


def _finish(fig, path: str | Path | None):
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return fig


def _labels(df: pd.DataFrame) -> list[str]:
    if "label" in df.columns:
        return [str(x) for x in df["label"]]
    if "policy" in df.columns:
        return [str(x) for x in df["policy"]]
    return [f"job {j}" for j in df.get("job", range(len(df)))]


def _run_file(run_dir, name: str) -> Path | None:
    path = Path(run_dir) / name
    if path.is_file():
        return path
    warnings.warn(f"{path} is missing: that run is left out of the plot", stacklevel=3)
    return None


# ------------------------------------------------------------------------------------------ Pareto
def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both ``x`` and ``y`` (both maximised), by ``x``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    front = []
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        if not dominated.any():
            front.append(i)
    return np.array(sorted(front, key=lambda i: (x[i], -y[i])), dtype=int)


def pareto(df: pd.DataFrame, path: str | Path | None = None):
    """Training throughput (``train_tokens_per_s``, 0 where a run does not train) against SLO attainment,
    one labelled point per run, the Pareto front (both maximised) drawn as a staircase."""
    slo = pd.to_numeric(df.get("slo_attainment", pd.Series(np.nan, index=df.index)), errors="coerce").to_numpy(float)
    train_col = df.get("train_tokens_per_s", pd.Series(np.nan, index=df.index))
    train = np.nan_to_num(pd.to_numeric(train_col, errors="coerce").to_numpy(float), nan=0.0)
    labels = _labels(df)
    ok = ~np.isnan(slo)
    fig, ax = _figure()
    xs, ys = slo[ok], train[ok]
    names = [lab for lab, keep in zip(labels, ok) if keep]
    ax.scatter(xs, ys, s=36, zorder=3)
    at: dict[tuple[float, float], list[str]] = {}  # runs on the same point share one label
    for x, y, name in zip(xs, ys, names):
        at.setdefault((float(x), float(y)), []).append(name)
    for (x, y), group in at.items():
        ax.annotate("\n".join(group), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8,
                    va="bottom")
    if len(xs):
        idx = pareto_front(xs, ys)
        fx, fy = xs[idx], ys[idx]
        # the front's staircase: between two front points the best attainable is the right one's y
        ax.step(fx, fy, where="pre", color="tab:red", alpha=0.7, label="Pareto front")
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="tab:red", zorder=4)
        ax.legend(fontsize=8, loc="best")
        pad = max(0.02, 0.1 * (xs.max() - xs.min()))
        ax.set_xlim(max(0.0, xs.min() - pad), min(1.0, xs.max() + pad) + 0.01)
    trains = bool(pd.to_numeric(train_col, errors="coerce").notna().any())
    ax.set_xlabel("SLO attainment")
    ax.set_ylabel("training throughput (tokens/s)" + ("" if trains else " - no run trains"))
    ax.set_title("Serving SLO attainment vs training throughput")
    ax.grid(alpha=0.3)
    return _finish(fig, path)


# ------------------------------------------------------------------------------------ latency CDFs
def _finished_latencies(path: Path) -> pd.DataFrame:
    table = pq.read_table(path, columns=["status", "ttft_s", "tpot_s"], filters=[("status", "==", "finished")])
    return table.select(["ttft_s", "tpot_s"]).to_pandas()


def latency_cdfs(df: pd.DataFrame, path: str | Path | None = None):
    """TTFT and TPOT CDFs of each run's finished requests (from its ``requests.parquet``)."""
    fig, axes = _figure(2, width=12.0, height=4.0)
    positive = {"ttft_s": True, "tpot_s": True}
    drawn = False
    for run_dir, label in zip(df["run_dir"], _labels(df)):
        file = _run_file(run_dir, "requests.parquet")
        if file is None:
            continue
        lat = _finished_latencies(file)
        for ax, col in zip(axes, ("ttft_s", "tpot_s")):
            values = lat[col].dropna().to_numpy()
            if values.size == 0:
                continue
            positive[col] &= bool(values.min() > 0)
            ax.plot(np.quantile(values, _QUANTILES), _QUANTILES, label=label)
            drawn = True
    for ax, col, title in zip(axes, ("ttft_s", "tpot_s"), ("TTFT", "TPOT")):
        if drawn and positive[col] and ax.lines:
            ax.set_xscale("log")
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("CDF (finished requests)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Latency CDFs")
    return _finish(fig, path)


# ----------------------------------------------------------------------------- utilisation timelines
def utilization_frame(gpus: pd.DataFrame) -> pd.Series:
    """Mean GPU utilisation (0..1) at each sample time of a ``gpus.parquet`` frame.

    Uses the ``utilization`` column where the run wrote one; otherwise the busy fraction of each GPU
    over each sampling interval, from the increase of ``busy_s``. Either way a value belongs to the
    interval that ends at its time, so each GPU's first sample (which ends none) is left out. Busy time is credited when an
    iteration (or a fast-advanced run of iterations) ends, so an interval can show more than its length
    of busy time: such values are clipped to 1 (the next interval shows correspondingly less).
    """
    if "utilization" in gpus.columns:  # the first sample of a GPU ends no interval: left out, as below
        util = gpus[["time_s", "gpu", "utilization"]]
        util = util[util.groupby("gpu").cumcount() > 0]
    else:
        g = gpus[["time_s", "gpu", "busy_s"]].sort_values(["gpu", "time_s"], kind="stable")
        by_gpu = g.groupby("gpu", sort=False)
        dt = by_gpu["time_s"].diff().to_numpy()
        dbusy = by_gpu["busy_s"].diff().to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(dt > 0, dbusy / dt, np.nan)
        util = pd.DataFrame({"time_s": g["time_s"].to_numpy(), "gpu": g["gpu"].to_numpy(),
                             "utilization": np.clip(frac, 0.0, 1.0)}).dropna()
    return util.groupby("time_s")["utilization"].mean()


def _read_gpus(path: Path) -> pd.DataFrame:
    names = set(pq.read_schema(path).names)
    cols = ["time_s", "gpu", "utilization"] if "utilization" in names else ["time_s", "gpu", "busy_s"]
    return pq.read_table(path, columns=cols).to_pandas()


def utilization_timelines(df: pd.DataFrame, path: str | Path | None = None):
    """Mean GPU utilisation over simulated time, one line per run (from its ``gpus.parquet``)."""
    fig, ax = _figure(width=10.0, height=4.0)
    for run_dir, label in zip(df["run_dir"], _labels(df)):
        file = _run_file(run_dir, "gpus.parquet")
        if file is None:
            continue
        util = utilization_frame(_read_gpus(file))
        if util.empty:
            continue
        t, u = util.index.to_numpy(float), util.to_numpy(float)
        step = max(1, len(u) // _MAX_POINTS)
        if step > 1:  # average blocks of intervals so long runs stay under ~1000 points
            n = len(u) // step * step
            t, u = t[:n].reshape(-1, step)[:, -1], u[:n].reshape(-1, step).mean(axis=1)
        # each value is the busy fraction of the interval ending at its time: draw it over that interval
        start = max(0.0, t[0] - (t[1] - t[0])) if len(t) > 1 else 0.0
        ax.plot(np.r_[start, t], np.r_[u[0], u], drawstyle="steps-pre", label=label)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("mean GPU utilisation")
    ax.set_title("GPU utilisation over time")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, path)
