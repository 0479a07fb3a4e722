"""``python -m calibrate.report DIR``: how well the cost model predicts measurements it was not fitted on.

For each grid table, every other interior grid value of each axis is held out: the fit is the
rectangular sub-grid of the even-indexed values of each axis (plus the last value, so the fit spans the
whole range and every held-out point is an interpolation, never an extrapolation), and the held-out
points are all grid points with an odd index on some axis. Predictions use the simulator's own
lookups: for ``prefill`` and ``decode`` a :class:`~simcolo.costs.CostModel` built on the sub-grids
(``prefill_s``, ``decode_s``); for ``train_stage`` (per stage and phase) and ``lora_step`` (per rank
and phase) the same bilinear rule over ``micro_batch`` x ``seq_len``.

It prints, per table, the number of held-out points and the median, 90th percentile and maximum of
``|predicted - measured| / measured``, draws measured against predicted into ``DIR/report_<table>.png``
and ends with ``heldout_median_rel_err=<x>``: the median over the held-out points of prefill and decode
together (the tables the simulator reads).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from simcolo.costs.cost_model import CostModel
from simcolo.costs.interp import cell
from simcolo.costs.tables import Grid, read_frame, read_metadata, read_required_grids
from simcolo.errors import SimcoloError
from simcolo.metrics.io import atomic_path


def split(n: int) -> tuple[list[int], list[int]]:
    """Indices of an axis of ``n`` values: (fitted, held out)."""
    fit = sorted(set(range(0, n, 2)) | {n - 1})
    return fit, [i for i in range(n) if i not in fit]


def _sub(grid: Grid, ri: list[int], ci: list[int]) -> Grid:
    return replace(grid, rows=grid.rows[ri], cols=grid.cols[ci], values=grid.values[np.ix_(ri, ci)])


def _held_points(grid: Grid) -> list[tuple[float, float, float]]:
    """(row value, column value, measured) of every held-out point."""
    fr, _ = split(len(grid.rows))
    fc, _ = split(len(grid.cols))
    return [(grid.rows[i], grid.cols[j], grid.values[i, j])
            for i in range(len(grid.rows)) for j in range(len(grid.cols)) if i not in fr or j not in fc]


def _fit(grid: Grid) -> Grid:
    return _sub(grid, split(len(grid.rows))[0], split(len(grid.cols))[0])


def bilinear(grid: Grid, x: float, y: float) -> float:
    """The CostModel's rule (interp.py) on a plain grid: linear in each key between grid points."""
    xs, ys = grid.rows.tolist(), grid.cols.tolist()
    i, t = cell(xs, x)
    j, u = cell(ys, y)
    z = grid.values
    return float((1 - t) * ((1 - u) * z[i, j] + u * z[i, j + 1]) + t * ((1 - u) * z[i + 1, j] + u * z[i + 1, j + 1]))


def serving_errors(directory: Path, meta: dict) -> dict[str, pd.DataFrame]:
    grids = read_required_grids(directory, meta)
    cm = CostModel(directory, meta, {name: _fit(g) for name, g in grids.items()})
    out = {}
    for name, grid in grids.items():
        rows = []
        for x, y, measured in _held_points(grid):
            if name == "prefill":
                pred = cm.prefill_s(int(x), int(y))
            else:
                pred = cm.decode_s(int(x), int(x) * int(y))
            rows.append({grid.row_axis: int(x), grid.col_axis: int(y), "measured_s": measured, "predicted_s": pred})
        out[name] = pd.DataFrame(rows, columns=[grid.row_axis, grid.col_axis, "measured_s", "predicted_s"])
    return out


def grouped_errors(df: pd.DataFrame, table: str, groups: list[str]) -> pd.DataFrame:
    """Held-out errors of a table of 2-D grids over (micro_batch, seq_len), one grid per ``groups``."""
    rows = []
    for key, part in df.groupby(groups, sort=True):
        pivot = part.pivot_table(index="micro_batch", columns="seq_len", values="latency_s", aggfunc="first")
        if pivot.isna().any().any() or min(pivot.shape) < 2:
            continue  # points skipped for memory: not a full grid, nothing to hold out reliably
        grid = Grid(table, "micro_batch", "seq_len", pivot.index.to_numpy(float), pivot.columns.to_numpy(float),
                    pivot.to_numpy(float))
        fit = _fit(grid)
        for x, y, measured in _held_points(grid):
            rows.append({**dict(zip(groups, key if isinstance(key, tuple) else (key,))), "micro_batch": int(x),
                         "seq_len": int(y), "measured_s": measured, "predicted_s": bilinear(fit, x, y)})
    return pd.DataFrame(rows)


def all_errors(directory: Path) -> dict[str, pd.DataFrame]:
    meta = read_metadata(directory)
    out = serving_errors(directory, meta)
    for table, groups in (("train_stage", ["num_stages", "stage", "phase"]), ("lora_step", ["rank", "phase"])):
        if table in meta["tables"]:
            out[table] = grouped_errors(read_frame(directory / meta["tables"][table]), table, groups)
    for df in out.values():
        if len(df):
            df["rel_err"] = (df["predicted_s"] - df["measured_s"]).abs() / df["measured_s"]
    return out


_MANTISSAS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(float(m) for m in range(1, 10)),
              (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
              tuple(1.0 + 0.1 * i for i in range(90)))


def log_ticks(lo: float, hi: float, want: int = 3) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi`` (both > 0): the coarsest of the 1-2-5 style
    series with at least ``want`` values in range (at most ~8), so an axis spanning less than a decade
    still has labelled ticks."""
    if not (lo > 0 and hi > lo):
        raise ValueError(f"log_ticks needs 0 < lo < hi, got {lo}, {hi}")
    best: list[float] = []
    for mantissas in _MANTISSAS:
        ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
                 for m in mantissas]
        ticks = sorted({float(f"{t:.6g}") for t in ticks if lo <= t <= hi})
        if len(ticks) > 8 and best:
            return best
        best = ticks
        if len(ticks) >= want:
            return ticks if len(ticks) <= 8 else ticks[:: int(np.ceil(len(ticks) / 8))]
    return best


def seconds_label(value: float) -> str:
    """A latency tick label with its unit: ``2 ms``, ``150 µs``, ``1.2 s``."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale or unit == "µs":
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} s"  # pragma: no cover


def figure(table: str, df: pd.DataFrame):
    """Measured against predicted latency of a table's held-out points, on log axes with labelled ticks
    (a matplotlib ``Figure``, built without pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig = Figure(figsize=(4.8, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(df["measured_s"], df["predicted_s"], s=14, alpha=0.8, label="held-out point")
    lo = float(min(df["measured_s"].min(), df["predicted_s"].min())) * 0.8
    hi = float(max(df["measured_s"].max(), df["predicted_s"].max())) * 1.25
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="predicted = measured")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency",
           ylabel="predicted latency (bilinear fit)",
           title=f"{table}: held-out points (median err {df['rel_err'].median():.1%})")
    ticks = log_ticks(lo, hi)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: seconds_label(v)))
        axis.set_minor_locator(NullLocator())
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3, which="major")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot(directory: Path, table: str, df: pd.DataFrame) -> Path:
    """Write :func:`figure` to ``DIR/report_<table>.png`` (atomically)."""
    fig = figure(table, df)
    path = directory / f"report_{table}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def report(directory: Path, plots: bool = True, stream=None) -> float:
    """Print the report; return the held-out median relative error of prefill + decode."""
    stream = sys.stdout if stream is None else stream
    errors = all_errors(directory)
    print(f"held-out fit errors of {directory} (fit on every other grid value, predict the rest)", file=stream)
    print(f"{'table':<14}{'held-out':>9}{'median':>10}{'p90':>10}{'max':>10}", file=stream)
    for table, df in errors.items():
        if not len(df):
            print(f"{table:<14}{0:>9}  (no axis has 3 or more values: nothing to hold out)", file=stream)
            continue
        e = df["rel_err"]
        print(f"{table:<14}{len(df):>9}{e.median():>10.2%}{e.quantile(0.9):>10.2%}{e.max():>10.2%}", file=stream)
        if plots:
            plot(directory, table, df)
    serving = pd.concat([errors[t]["rel_err"] for t in ("prefill", "decode") if len(errors[t])])
    value = float(serving.median()) if len(serving) else float("nan")
    if plots:
        print(f"plots: {directory}/report_<table>.png", file=stream)
    print(f"heldout_median_rel_err={value:.6g}", file=stream)
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibrate.report", description=__doc__.split("\n")[0])
    ap.add_argument("directory", type=Path, help="a cost-table directory (written by python -m calibrate)")
    ap.add_argument("--no-plots", action="store_true", help="print the errors only")
    args = ap.parse_args(argv)
    try:
        report(args.directory, plots=not args.no_plots)
    except SimcoloError as exc:
        print(f"calibrate.report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
