"""Comparison plots of the runs of a multirun (one :func:`simcolo.metrics.comparison.load_runs` frame).

Each function draws one figure and returns it (a notebook shows it inline); with ``path`` it also
writes it there as PNG, atomically. A plot that has nothing to show returns ``None`` and writes nothing
(:func:`pareto` and :func:`training_progress` of a sweep where no run trains). Figures are built without
pyplot, so nothing here changes the matplotlib backend of the caller. Per-run files are read column by
column, only what is drawn, and each curve is reduced to at most ~1000 points.

Every figure gives run *i* (the *i*-th row of the frame) the same colour, ``C<i>``; the Pareto plot
numbers its points ``1..n`` in that order and its legend names them.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from simcolo.metrics.io import atomic_path

_QUANTILES = np.linspace(0.0, 1.0, 1001)
_MAX_POINTS = 1000
_MAX_LABEL = 32           # longest label a legend shows whole


def _figure(ncols: int = 1, width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")   # titles, labels and outside legends kept clear
    FigureCanvasAgg(fig)     # a renderer to measure text with (label placement); IPython swaps canvases itself
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


def _shorten(label: str) -> str:
    """``policy=lemix workload.rate_scale=2`` -> ``lemix rate_scale=2``: a policy override by its value, any
    other by its last key component; cut to :data:`_MAX_LABEL` characters."""
    words = []
    for word in label.split():
        key, eq, value = word.partition("=")
        if not eq:
            words.append(word)
        elif key.lstrip("+~") == "policy":
            words.append(value)
        else:
            words.append(f"{key.lstrip('+~').rsplit('.', 1)[-1]}={value}")
    text = " ".join(words) or label
    return text if len(text) <= _MAX_LABEL else text[:_MAX_LABEL - 1] + "…"


def short_labels(df: pd.DataFrame) -> list[str]:
    """The runs' labels as plot legends show them (see :func:`_shorten`); the full labels wherever
    shortening would make two runs look the same."""
    full = _labels(df)
    short = [_shorten(x) for x in full]
    return short if len(set(short)) == len(short) else full


def _color(i: int) -> str:
    return f"C{i % 10}"


def _legend(ax, entries: int, longest: int, inside: str = "best") -> None:
    """Inside the axes when it is small; below them (``bbox_inches='tight'`` keeps it) when there are
    many runs or long labels, so it never covers a curve."""
    if entries == 0:
        return
    if entries <= 4 and longest <= 24:
        ax.legend(fontsize=8, loc=inside)
    else:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2 if entries > 3 else 1,
                  frameon=False)


def _run_file(run_dir, name: str) -> Path | None:
    path = Path(run_dir) / name
    if path.is_file():
        return path
    warnings.warn(f"{path} is missing: that run is left out of the plot", stacklevel=3)
    return None


def _numbers(df: pd.DataFrame, column: str) -> np.ndarray:
    col = df[column] if column in df.columns else pd.Series(np.nan, index=df.index)
    return pd.to_numeric(col, errors="coerce").to_numpy(float)


def trains(df: pd.DataFrame) -> np.ndarray:
    """Per run: did it train? (a ``training_kind`` other than ``none``, or a training throughput)."""
    kind = df["training_kind"] if "training_kind" in df.columns else pd.Series(np.nan, index=df.index)
    by_kind = kind.map(lambda k: isinstance(k, str) and k not in ("", "none")).to_numpy(bool)
    return by_kind | ~np.isnan(_numbers(df, "train_tokens_per_s"))


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


# directions tried for a point's number, nearest first: up-right, down-right, up-left, down-left, right, left,
# up, down; each at growing distances (points)
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_OFFSETS = [(ux * r, uy * r, ux, uy) for r in (6, 12, 20, 32) for ux, uy in _DIRECTIONS]
_HA = {1: "left", 0: "center", -1: "right"}
_VA = {1: "bottom", 0: "center", -1: "top"}


def place_labels(ax, xs, ys, texts, fontsize: float = 8.5) -> list:
    """Annotate point ``i`` at (``xs[i]``, ``ys[i]``) with ``texts[i]``, each text at the first offset
    (of :data:`_OFFSETS`) where it overlaps no text placed before it, no point and nothing outside the
    axes; where every offset collides, the one that overlaps least. Call it after the limits are set.
    Returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.column_stack([xs, ys])) if len(xs) else np.empty((0, 2))
    r = 5.0 * fig.dpi / 72.0           # a marker's half size in pixels (its Pareto ring included)
    markers = [(x - r, y - r, x + r, y + r) for x, y in pts]
    placed: list[tuple[float, float, float, float]] = []

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    out = []
    for x, y, text in zip(xs, ys, texts):
        best = None
        for dx, dy, ux, uy in _OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha=_HA[ux], va=_VA[uy], zorder=5)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            outside = (max(0.0, frame.x0 - box[0]) + max(0.0, box[2] - frame.x1)) * bb.height + \
                      (max(0.0, frame.y0 - box[1]) + max(0.0, box[3] - frame.y1)) * bb.width
            cost = outside + sum(overlap(box, o) for o in placed + markers)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0.0:
                break
        placed.append(best[2])
        out.append(best[1])
    return out


def training_axis(df: pd.DataFrame) -> tuple[np.ndarray, str, bool]:
    """The training throughput runs are compared on: ``train_flops_per_s`` (job-neutral: full-parameter and
    LoRA runs compare), or ``train_tokens_per_s`` for summaries written before it existed; 0 where a run does
    not train. Returns (values, axis label, whether they are FLOP/s)."""
    flops = _numbers(df, "train_flops_per_s")
    if not np.isnan(flops).all():
        return np.nan_to_num(flops, nan=0.0), "training throughput (model PFLOP/s, job-neutral)", True
    return np.nan_to_num(_numbers(df, "train_tokens_per_s"), nan=0.0), "training throughput (tokens/s)", False


def _job_note(df: pd.DataFrame, i: int) -> str:
    """`` (full, 64,853 tok/s)``: a training run's job and its throughput in its own unit (legends)."""
    job = df["train_job"].iloc[i] if "train_job" in df.columns else None
    tokens = _numbers(df, "train_tokens_per_s")[i]
    parts = [str(job)] if isinstance(job, str) and job not in ("", "none") else []
    if not np.isnan(tokens):
        parts.append(f"{tokens:,.0f} tok/s")
    return f" ({', '.join(parts)})" if parts else ""


def pareto(df: pd.DataFrame, path: str | Path | None = None):
    """Training throughput (``train_flops_per_s``, job-neutral, 0 where a run does not train; see
    :func:`training_axis`) against SLO attainment: one numbered point per run (the legend names them, with
    the job and its tokens/s beside), the Pareto front (both maximised) as a staircase. The SLO axis stops at 1 (no run can attain more; the region past it is shaded) and both
    axes say which way is better. ``None``, with nothing written, when no run trains: there is nothing
    to trade SLO attainment against."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    trained = trains(df)
    if not trained.any():
        return None
    slo = _numbers(df, "slo_attainment")
    train, ylabel, flops = training_axis(df)
    short = short_labels(df)
    ok = ~np.isnan(slo)
    fig, ax = _figure(width=7.5, height=4.6)
    idx = np.flatnonzero(ok)
    xs, ys = slo[ok], train[ok]
    for i in idx:
        ax.scatter([slo[i]], [train[i]], s=40, color=_color(i), zorder=3, edgecolors="white", linewidths=0.6,
                   label=f"{i + 1}  {short[i]}" + (_job_note(df, i) if trained[i] else " (no training)"))

    # limits: attainment within [0, 1] with a little margin; throughput from 0
    lo_x, hi_x = (float(xs.min()), float(xs.max())) if len(xs) else (0.0, 1.0)
    pad = max(0.02, 0.1 * (hi_x - lo_x))
    lo, hi = max(0.0, lo_x - pad), min(1.0, hi_x + pad)
    margin = 0.04 * (hi - lo)
    ax.set_xlim(lo - margin, hi + margin)
    ticks = [t for t in MaxNLocator(6).tick_values(lo, hi) if lo - 1e-9 <= t <= min(hi, 1.0) + 1e-9]
    ax.set_xticks(ticks)
    if hi + margin > 1.0:
        ax.axvspan(1.0, hi + margin, color="0.92", zorder=0, lw=0)
    top = float(ys.max()) if len(ys) else 0.0
    ax.set_ylim(0.0, top * 1.15 if top > 0 else 1.0)
    ax.yaxis.set_major_formatter(FuncFormatter((lambda v, _: f"{v / 1e15:g}") if flops else (lambda v, _: f"{v:,.0f}")))

    if len(xs):
        front = pareto_front(xs, ys)
        fx, fy = xs[front], ys[front]
        # the front's staircase: between two front points the best attainable is the right one's y
        ax.step(fx, fy, where="pre", color="tab:red", alpha=0.6, lw=1.2, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="tab:red", zorder=4)
    ax.set_xlabel("SLO attainment (share of requests within TTFT and TPOT SLOs)   higher is better →")
    ax.set_ylabel(f"{ylabel}   higher is better →")
    ax.set_title("Serving SLO attainment vs training throughput (best: top right)")
    ax.grid(alpha=0.3)
    if len(idx):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="run",
                  title_fontsize=8)
    # the layout fixed first (the axes' place in the figure), then the numbers placed in it
    fig.get_layout_engine().execute(fig)
    fig.set_layout_engine("none")
    # numbers beside the points; runs on the same point share one ("1,2")
    groups: dict[tuple[float, float], list[int]] = {}
    for i in idx:
        groups.setdefault((float(slo[i]), float(train[i])), []).append(i + 1)
    place_labels(ax, [k[0] for k in groups], [k[1] for k in groups], [",".join(map(str, v)) for v in groups.values()])
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
    short = short_labels(df)
    for i, (run_dir, label) in enumerate(zip(df["run_dir"], short)):
        file = _run_file(run_dir, "requests.parquet")
        if file is None:
            continue
        lat = _finished_latencies(file)
        for ax, col in zip(axes, ("ttft_s", "tpot_s")):
            values = lat[col].dropna().to_numpy()
            if values.size == 0:
                continue
            positive[col] &= bool(values.min() > 0)
            ax.plot(np.quantile(values, _QUANTILES), _QUANTILES, label=label, color=_color(i))
            drawn = True
    for ax, col, title in zip(axes, ("ttft_s", "tpot_s"), ("TTFT", "TPOT")):
        log = drawn and positive[col] and bool(ax.lines)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(f"{title} (s{', log scale' if log else ''})   ← lower is better")
        ax.set_ylabel("share of finished requests at or below")
        ax.set_title(f"{title} CDF (further left and higher is better)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    if axes[0].lines:
        _legend(axes[0], len(axes[0].lines), max(len(s) for s in short), inside="lower right")
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
    short = short_labels(df)
    for i, (run_dir, label) in enumerate(zip(df["run_dir"], short)):
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
        ax.plot(np.r_[start, t], np.r_[u[0], u], drawstyle="steps-pre", label=label, color=_color(i))
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("mean GPU utilisation (busy fraction)")
    ax.set_title("GPU utilisation over time (mean over the run's GPUs)")
    ax.grid(alpha=0.3)
    _legend(ax, len(ax.lines), max((len(s) for s in short), default=0), inside="lower right")
    return _finish(fig, path)


# ------------------------------------------------------------------------------- training progress
def training_curve(training: pd.DataFrame) -> pd.DataFrame:
    """Cumulative training progress of one run from its ``training.parquet`` (one row per optimizer
    step): ``time_s`` (each step's end), ``tokens`` and ``steps`` summed over all trainers up to it."""
    t = training.sort_values("end_s", kind="stable")
    return pd.DataFrame({"time_s": t["end_s"].to_numpy(float), "tokens": t["tokens"].cumsum().to_numpy(float),
                         "steps": np.arange(1, len(t) + 1, dtype=float)})


def _thin(t: np.ndarray, *ys: np.ndarray):
    step = max(1, len(t) // _MAX_POINTS)
    if step == 1:
        return (t, *ys)
    keep = np.r_[np.arange(0, len(t), step), len(t) - 1]
    return (t[keep], *(y[keep] for y in ys))


def training_progress(df: pd.DataFrame, path: str | Path | None = None):
    """Training tokens and optimizer steps (all trainers) over simulated time, one line per run that
    trains (from its ``training.parquet``). ``None``, with nothing written, when no run trains (or no
    run that trains has a ``training.parquet``)."""
    from matplotlib.ticker import FuncFormatter

    trained = trains(df)
    if not trained.any():
        return None
    fig, (ax_t, ax_s) = _figure(2, width=12.0, height=4.0)
    short = short_labels(df)
    for i, (run_dir, label) in enumerate(zip(df["run_dir"], short)):
        if not trained[i]:
            continue
        file = _run_file(run_dir, "training.parquet")
        if file is None:
            continue
        curve = training_curve(pq.read_table(file, columns=["end_s", "tokens"]).to_pandas())
        t, tok, steps = _thin(*(np.r_[0.0, curve[c].to_numpy()] for c in ("time_s", "tokens", "steps")))
        end = df["duration_s"].iloc[i] if "duration_s" in df.columns else np.nan
        if np.isfinite(end) and end > t[-1]:     # flat to the run's end: no more steps
            t, tok, steps = np.r_[t, end], np.r_[tok, tok[-1]], np.r_[steps, steps[-1]]
        ax_t.plot(t, tok, drawstyle="steps-post", color=_color(i), label=label)
        ax_s.plot(t, steps, drawstyle="steps-post", color=_color(i), label=label)
    if not ax_t.lines:
        return None
    ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for ax, what in ((ax_t, "training tokens (cumulative)"), (ax_s, "optimizer steps (cumulative)")):
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
    ax_t.set_title("Training tokens, all trainers (steeper is faster)")
    ax_s.set_title("Optimizer steps, all trainers (steeper is faster)")
    _legend(ax_t, len(ax_t.lines), max(len(s) for s in short), inside="upper left")
    fig.suptitle("Training progress")
    return _finish(fig, path)


def slug(text: str) -> str:
    """A label as a file or HTML id fragment."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"
