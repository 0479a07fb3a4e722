"""Simulated against measured: two run directories compared metric by metric.

Both directories hold what a run writes — ``summary.json`` and ``requests.parquet``, and with training
``training.parquet`` — one from ``simcolo`` (the simulation), the other from a live replay that writes
the same files (or any second run: the comparison only reads the files)::

    python -m simcolo.compare SIM_RUN_DIR REPLAY_RUN_DIR [--plot PATH] [--csv PATH]

It prints one row per metric: the first run's value (*simulated*), the second's (*measured*) and the
relative error ``|sim - meas| / |meas|``. A metric missing (or NaN) in either run is shown as ``-``
and has no error; ``meas == 0`` gives error 0 if ``sim == 0`` too, else ``inf``. It writes the table as
CSV (default ``REPLAY_RUN_DIR/compare.csv``) and the TTFT and TPOT CDFs of both runs' finished
requests on one figure (default ``REPLAY_RUN_DIR/compare_cdf.png``), each atomically. Its last line is
``max_rel_err=<number>``: the largest error over :data:`MAX_ROWS` present in both runs (``nan`` if
none is).

Rows, in this order, those that either run has: :data:`METRICS` from ``summary.json``, and
``train_step_time_s`` — the mean of ``end_s - start_s`` over the optimizer steps of
``training.parquet`` whose ``start_s`` is finite (co-located pipelines stream tasks through
overlapping steps and record no start, so their runs have no such row).

Bad input (a missing directory or file, invalid JSON, a parquet file without the columns read) raises
:class:`CompareError`, whose message names the path and what was expected; the command prints it as
``simcolo.compare: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from simcolo.errors import SimcoloError
from simcolo.metrics.io import atomic_path

PROG = "simcolo.compare"

# Row order. ``train_step_time_s`` comes from training.parquet, the rest from summary.json.
METRICS: tuple[str, ...] = (
    "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
    "tpot_mean_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s",
    "slo_attainment", "request_throughput_rps", "train_tokens_per_s", "train_step_time_s",
    "inference_loss_mean",
)
# The rows ``max_rel_err`` is taken over (where both runs have them).
MAX_ROWS: tuple[str, ...] = ("ttft_mean_s", "tpot_mean_s", "train_tokens_per_s")
COLUMNS: tuple[str, ...] = ("metric", "simulated", "measured", "rel_err")

SUMMARY = "summary.json"
REQUESTS = "requests.parquet"
TRAINING = "training.parquet"
REQUEST_COLUMNS = ("status", "ttft_s", "tpot_s")
TRAINING_COLUMNS = ("start_s", "end_s")

_QUANTILES = np.linspace(0.0, 1.0, 1001)


class CompareError(SimcoloError):
    """A run directory, or a file in it, is missing or malformed. The message is ``<path>: <what was expected>``."""


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    """What the comparison reads from one run directory."""

    dir: Path
    metrics: dict[str, float]    # the rows this run has (NaN where the run has the key but no value)

    @property
    def requests_path(self) -> Path:
        return self.dir / REQUESTS


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CompareError(f"{path}: expected the run's {SUMMARY} (a completed run writes it last); "
                           f"there is no such file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as exc:
        raise CompareError(f"{path}: expected a JSON object of summary keys, the file is not text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: expected a JSON object of summary keys, the JSON is invalid ({exc})") from None
    except OSError as exc:
        raise CompareError(f"{path}: expected a readable {SUMMARY} ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: expected a JSON object of summary keys, got a JSON {type(data).__name__}")
    return data


def _summary_metrics(path: Path, data: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key in METRICS:
        if key not in data or data[key] is None:   # null: the run has no value for it
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CompareError(f"{path}: expected a number (or null) for key '{key}', got {value!r}")
        out[key] = float(value)
    return out


def _check_columns(path: Path, columns: Sequence[str], what: str) -> None:
    """Raise a :class:`CompareError` unless ``path`` is a readable parquet file with ``columns``."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise CompareError(f"{path}: expected {what}; there is no such file")
    try:
        names = set(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for unreadable files
        raise CompareError(f"{path}: expected {what} (a parquet file); it cannot be read ({exc})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise CompareError(f"{path}: expected {what} with columns {', '.join(columns)}; "
                           f"it lacks {', '.join(missing)}")


def _read_columns(path: Path, columns: Sequence[str], what: str):
    """The named columns of a parquet file as a pyarrow table, or a :class:`CompareError`."""
    import pyarrow.parquet as pq

    _check_columns(path, columns, what)
    try:
        return pq.read_table(path, columns=list(columns))
    except Exception as exc:
        raise CompareError(f"{path}: expected {what} (a parquet file); it cannot be read ({exc})") from None


def train_step_time_s(path: str | Path) -> float | None:
    """Mean of ``end_s - start_s`` over the steps of a ``training.parquet`` whose ``start_s`` is finite;
    ``None`` if the file does not exist or has no such step."""
    path = Path(path)
    if not path.is_file():
        return None
    table = _read_columns(path, TRAINING_COLUMNS, "the run's optimizer steps")
    start = table.column("start_s").to_numpy(zero_copy_only=False).astype(float)
    end = table.column("end_s").to_numpy(zero_copy_only=False).astype(float)
    ok = np.isfinite(start)
    if not ok.any():
        return None
    return float(np.mean(end[ok] - start[ok]))


def load_run(run_dir: str | Path) -> Run:
    """Read and check one run directory: ``summary.json`` and ``requests.parquet`` must be there (the
    latter with ``status``, ``ttft_s``, ``tpot_s``); ``training.parquet`` is optional."""
    d = Path(run_dir)
    if not d.is_dir():
        what = "it is not a directory" if d.exists() else "there is no such directory"
        raise CompareError(f"{d}: expected a run directory holding {SUMMARY} and {REQUESTS}; {what}")
    summary_path = d / SUMMARY
    metrics = _summary_metrics(summary_path, _read_summary(summary_path))
    _check_columns(d / REQUESTS, REQUEST_COLUMNS, "the run's per-request records")
    step = train_step_time_s(d / TRAINING)
    if step is not None:
        metrics["train_step_time_s"] = step
    return Run(d, {k: metrics[k] for k in METRICS if k in metrics})


# -------------------------------------------------------------------------------------- the table
def rel_err(sim: float, meas: float) -> float:
    """``|sim - meas| / |meas|``; NaN if either is NaN; ``meas == 0``: 0 if ``sim == 0`` too, else inf."""
    if math.isnan(sim) or math.isnan(meas):
        return math.nan
    if meas == 0:
        return 0.0 if sim == 0 else math.inf
    return abs(sim - meas) / abs(meas)


def _table(sim: Run, meas: Run) -> pd.DataFrame:
    rows = []
    for key in METRICS:
        if key not in sim.metrics and key not in meas.metrics:
            continue
        s = sim.metrics.get(key, math.nan)
        m = meas.metrics.get(key, math.nan)
        rows.append((key, s, m, rel_err(s, m)))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype({"metric": object, "simulated": float, "measured": float, "rel_err": float})


def compare_runs(sim_dir: str | Path, meas_dir: str | Path) -> pd.DataFrame:
    """The comparison table of two run directories: columns ``metric``, ``simulated`` (the first
    run), ``measured`` (the second), ``rel_err``; one row per metric that either run has, NaN where
    a run lacks it (and then in ``rel_err``). Raises :class:`CompareError` for bad input."""
    return _table(load_run(sim_dir), load_run(meas_dir))


def max_rel_err(df: pd.DataFrame) -> float:
    """The largest ``rel_err`` over the rows :data:`MAX_ROWS` that both runs have (NaN if none)."""
    sel = df.loc[df["metric"].isin(MAX_ROWS), "rel_err"].to_numpy(float)
    sel = sel[~np.isnan(sel)]
    return float(sel.max()) if sel.size else math.nan


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.6g}"


def format_table(df: pd.DataFrame) -> str:
    """The table as aligned text, ``-`` for missing values."""
    cells = [list(COLUMNS)] + [[str(r.metric), _num(r.simulated), _num(r.measured), _num(r.rel_err)]
                               for r in df.itertuples(index=False)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """The table as CSV (empty cells where a value is missing), written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


# -------------------------------------------------------------------------------------------- plot
def _finished_latencies(path: Path) -> pd.DataFrame:
    table = _read_columns(path, REQUEST_COLUMNS, "the run's per-request records")
    df = table.to_pandas()
    return df.loc[df["status"] == "finished", ["ttft_s", "tpot_s"]]


def plot_cdfs(runs: Sequence[tuple[str, Run]], path: str | Path):
    """TTFT and TPOT CDFs (two panels) of the finished requests of each ``(label, run)``, saved as PNG
    to ``path`` atomically. Returns the figure (built without pyplot: the caller's backend is left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 4.0))
    axes = fig.subplots(1, 2)
    positive = {"ttft_s": True, "tpot_s": True}
    for label, run in runs:
        lat = _finished_latencies(run.requests_path)
        for ax, col in zip(axes, ("ttft_s", "tpot_s")):
            values = lat[col].to_numpy(float)
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            positive[col] &= bool(values.min() > 0)
            ax.plot(np.quantile(values, _QUANTILES), _QUANTILES, label=f"{label} ({values.size:,} requests)")
    for ax, col, title in zip(axes, ("ttft_s", "tpot_s"), ("TTFT", "TPOT")):
        if ax.lines and positive[col]:
            ax.set_xscale("log")
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no finished requests", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("CDF (finished requests)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("Simulated vs measured latency CDFs")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return fig


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Compare a simulated run with a measured (replayed) run, metric by metric.")
    p.add_argument("sim_dir", metavar="SIM_RUN_DIR", help="run directory of the simulation (simcolo's output)")
    p.add_argument("meas_dir", metavar="REPLAY_RUN_DIR", help="run directory of the measured run (live replay)")
    p.add_argument("--plot", metavar="PATH", help="TTFT/TPOT CDF figure (default: REPLAY_RUN_DIR/compare_cdf.png)")
    p.add_argument("--csv", metavar="PATH", help="the table as CSV (default: REPLAY_RUN_DIR/compare.csv)")
    return p


@contextmanager
def _writing(path: Path):
    try:
        yield
    except OSError as exc:
        raise CompareError(f"{path}: expected a path a file can be written to ({exc.strerror or exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simcolo.compare SIM_RUN_DIR REPLAY_RUN_DIR [--plot PATH] [--csv PATH]``; returns the
    exit status (0, or 2 for bad arguments or input)."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # argparse has printed the usage and the error (or --help)
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        sim, meas = load_run(args.sim_dir), load_run(args.meas_dir)
        df = _table(sim, meas)
        csv_path = Path(args.csv) if args.csv else meas.dir / "compare.csv"
        plot_path = Path(args.plot) if args.plot else meas.dir / "compare_cdf.png"
        with _writing(csv_path):
            write_csv(df, csv_path)
        with _writing(plot_path):
            plot_cdfs([("simulated", sim), ("measured", meas)], plot_path)
    except CompareError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"simulated: {sim.dir}")
    print(f"measured:  {meas.dir}")
    print(format_table(df))
    print(f"wrote {csv_path} and {plot_path}")
    print(f"max_rel_err={max_rel_err(df):.6g}")  # last line: scripts read it
    return 0


if __name__ == "__main__":
    sys.exit(main())
