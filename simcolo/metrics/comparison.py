"""Policies side by side: the runs of one Hydra multirun directory, compared.

``simcolo -m policy=a,b ...`` writes one job directory per run (``multirun/<date>/<time>/<n>/``).
:func:`load_runs` reads their ``summary.json`` files into one table, :func:`comparison_table` turns it
into the side-by-side view (runs as columns, metrics as rows), :func:`write_report` writes
``comparison.csv``, ``comparison.md``, the comparison plots and ``report.html`` (all of it in one
self-contained page, :mod:`simcolo.metrics.report_html`) into the multirun directory -- and, when the runs
span several points of the interference dial, whether the policies' ranking holds across them
(``comparison_ranking.csv`` and a section of ``comparison.md``, :mod:`simcolo.metrics.ranking`) -- and
:class:`ComparisonCallback` does that at the end of every sweep (``conf/hydra/callbacks/compare.yaml``).

By hand, e.g. after a sweep that stopped on a failed job::

    python -m simcolo.metrics.comparison multirun/<date>/<time>

Summary keys a run does not have (training metrics of serving-only runs) are NaN; a job directory
without ``summary.json`` (failed or still running) is listed in ``df.attrs["incomplete"]`` with a
warning, never dropped silently.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from simcolo.errors import SimcoloError
from simcolo.metrics.io import atomic_path

try:  # hydra is a dependency; keep the module importable for plain analysis without it anyway
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object

DEFAULT_KEYS: tuple[str, ...] = (
    "slo_attainment", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
    # training in a job-neutral unit first (full-parameter and LoRA runs compare), then in the job's own
    "train_job", "train_flops_per_s", "train_mfu", "train_tokens_per_s", "train_samples_per_s", "optimizer_steps", "inference_loss_mean", "bubble_rate",
    "lemix_throughput_tasks_per_s", "gpu_utilization_mean",
)
# Keys of co-located runs that serving-only runs lack: always present as columns (NaN where missing).
OPTIONAL_KEYS: tuple[str, ...] = (
    "train_job", "train_flops_per_s", "train_mfu", "train_tokens_per_s", "train_samples_per_s", "optimizer_steps", "inference_loss_mean", "bubble_rate",
    "lemix_throughput_tasks_per_s", "gpu_utilization_mean", "slo_attainment_1x", "slo_attainment_5x",
    "slo_attainment_10x", "training_kind",
)
_META = ("job", "label", "overrides", "run_dir")
#: always written (``report.html`` last: it embeds the plots)
REPORT_FILES = ("comparison.csv", "comparison.md", "report.html")
#: written when the runs span two or more interference scales (:mod:`simcolo.metrics.ranking`)
RANKING_FILE = "comparison_ranking.csv"
#: the comparison plots (with plots on); the Pareto and training plots only when some run trains
PLOT_FILES = ("comparison_pareto.png", "comparison_latency_cdf.png", "comparison_utilization.png",
              "comparison_training.png")


class NoRunsError(SimcoloError, FileNotFoundError):
    """The directory holds no (completed) job directories of a Hydra multirun."""


class IncompleteRunsWarning(UserWarning):
    """Some job directories of the multirun have no summary.json (the job failed or is still running)."""


# ---------------------------------------------------------------------------------------- loading
def _job_dirs(root: Path) -> list[Path]:
    """Subdirectories that are Hydra jobs: named by the job number (Hydra's default subdir), or holding
    a ``.hydra/`` or a ``summary.json``."""
    out = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        if d.name.isdigit() or (d / ".hydra").is_dir() or (d / "summary.json").is_file():
            out.append(d)
    return out


def _job_number(d: Path) -> int | None:
    if d.name.isdigit():
        return int(d.name)
    hydra_yaml = d / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        try:
            num = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {}).get("job", {}).get("num")
            return int(num) if num is not None else None
        except (yaml.YAMLError, AttributeError, TypeError, ValueError):
            return None
    return None


def _overrides(d: Path) -> list[str]:
    path = d / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = yaml.safe_load(path.read_text()) or []
    return [str(o) for o in loaded] if isinstance(loaded, list) else [str(loaded)]


def resolve_multirun_dir(path: str | Path, bases: Sequence[str | Path] | None = None) -> Path:
    """The sweep directory ``path`` names, for the notebooks' ``SIMCOLO_MULTIRUN_DIR``.

    ``~`` is expanded; an absolute path is taken as is. A relative one is looked up, in order, under
    ``bases``: by default the current working directory (of the notebook's kernel process), then
    ``$PWD`` (the directory the shell that started Jupyter or ``nbconvert`` stood in, which the kernel
    inherits even though Jupyter starts it in the notebook's folder), then the project root of a checkout
    (where ``simcolo -m`` run from it writes ``multirun/``). The first base under which it exists wins. Raises :class:`NoRunsError` naming every place tried when it exists nowhere.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        if not p.is_dir():
            raise NoRunsError(f"multirun directory {p} does not exist")
        return p
    if bases is None:
        from simcolo.paths import PROJECT_ROOT

        checkout = [PROJECT_ROOT] if (PROJECT_ROOT / "pyproject.toml").is_file() else []   # not site-packages
        bases = [Path.cwd()] + ([Path(os.environ["PWD"])] if os.environ.get("PWD") else []) + checkout
    tried = []
    for base in bases:
        candidate = (Path(base) / p).resolve()
        if candidate.is_dir():
            return candidate
        if candidate not in tried:
            tried.append(candidate)
    raise NoRunsError(f"multirun directory {path} not found; a relative path is looked up under the working "
                      f"directory, $PWD and the project root: tried {', '.join(str(t) for t in tried)}")


def _labels(policies: Sequence[Any], overrides: Sequence[list[str]], jobs: Sequence[int]) -> list[str]:
    """Column names of the side-by-side view: the policy when each run has its own, else the overrides
    that differ between runs (``job <n>`` where nothing tells runs apart)."""
    names = [str(p) for p in policies]
    if names and all(p not in ("", "nan", "None") for p in names) and len(set(names)) == len(names):
        return names
    common = set.intersection(*(set(o) for o in overrides)) if len(overrides) > 1 else set()
    labels = []
    for p, o, j in zip(names, overrides, jobs):
        varying = [x for x in o if x not in common]
        labels.append(" ".join(varying) or (p if p not in ("", "nan", "None") else f"job {j}"))
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [f"{label} (job {j})" if seen[label] > 1 else label for label, j in zip(labels, jobs)]


def load_runs(multirun_dir: str | Path) -> pd.DataFrame:
    """One row per completed job of the multirun at ``multirun_dir`` (sorted by job number).

    Columns: every summary key (NaN where a run lacks it; :data:`OPTIONAL_KEYS` always present), plus
    ``job`` (int), ``run_dir`` (str), ``overrides`` (the job's overrides joined by spaces) and
    ``label`` (its column name in :func:`comparison_table`). Job directories without ``summary.json``
    are listed (as paths) in ``df.attrs["incomplete"]`` and named in an :class:`IncompleteRunsWarning`.
    Raises :class:`NoRunsError` (a ``FileNotFoundError``) if the directory is missing, has no job
    directories, or none of them completed.
    """
    root = Path(multirun_dir)
    if not root.is_dir():
        raise NoRunsError(f"multirun directory {root} does not exist (expected the sweep directory of "
                          f"`simcolo -m ...`, e.g. multirun/<date>/<time>)")
    dirs = _job_dirs(root)
    if not dirs:
        raise NoRunsError(f"no job directories in {root}: expected the sweep directory of `simcolo -m ...` "
                          f"(e.g. multirun/<date>/<time>) holding one directory per job (0/, 1/, ...) "
                          f"with a summary.json each")
    jobs = []
    for d in dirs:
        num = _job_number(d)
        jobs.append((num if num is not None else math.inf, d.name, d))
    jobs.sort(key=lambda t: (t[0], t[1]))

    rows, incomplete = [], []
    for i, (num, _, d) in enumerate(jobs):
        summary_path = d / "summary.json"
        if not summary_path.is_file():
            incomplete.append(str(d))
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{summary_path} is not valid JSON: {exc}") from exc
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path} must hold a JSON object of summary keys")
        ov = _overrides(d)
        rows.append({**summary, "job": int(num) if num != math.inf else i, "run_dir": str(d),
                     "overrides": " ".join(ov), "_override_list": ov})
    if incomplete:
        warnings.warn(f"{len(incomplete)} of {len(jobs)} job directories in {root} have no summary.json "
                      f"(the job failed or is still running) and are left out: {', '.join(incomplete)}",
                      IncompleteRunsWarning, stacklevel=2)
    if not rows:
        raise NoRunsError(f"no completed runs in {root}: none of its {len(jobs)} job directories has a "
                          f"summary.json ({', '.join(incomplete)})")

    df = pd.DataFrame(rows)
    for key in OPTIONAL_KEYS:
        if key not in df.columns:
            df[key] = float("nan")
    policies = df["policy"] if "policy" in df.columns else [""] * len(df)
    df["label"] = _labels(list(policies), list(df["_override_list"]), list(df["job"]))
    df = df.drop(columns="_override_list")
    df["job"] = df["job"].astype("int64")
    df = df[list(_META) + [c for c in df.columns if c not in _META]].reset_index(drop=True)
    df.attrs["incomplete"] = incomplete
    df.attrs["multirun_dir"] = str(root)
    return df


# ------------------------------------------------------------------------------ the side-by-side view
def comparison_table(df: pd.DataFrame, keys: Sequence[str] = DEFAULT_KEYS) -> pd.DataFrame:
    """Runs as columns (named by policy, or by the overrides that differ), ``keys`` as rows, in order.

    Rows that are NaN (or ``none``, the ``train_job`` of a run that does not train) for every run -- the
    training metrics of serving-only sweeps -- are left out.
    """
    if "label" in df.columns:
        labels = list(df["label"])
    else:
        policies = df["policy"] if "policy" in df.columns else [""] * len(df)
        overrides = [str(o).split() for o in df.get("overrides", [""] * len(df))]
        jobs = list(df["job"]) if "job" in df.columns else list(range(len(df)))
        labels = _labels(list(policies), overrides, jobs)
    data = {key: (list(df[key]) if key in df.columns else [float("nan")] * len(df)) for key in keys}
    table = pd.DataFrame(data, index=pd.Index(labels, name="run")).T
    table.index.name = "metric"
    missing = table.isna() | (table == "none")    # train_job "none": a run that does not train
    table = table[~missing.all(axis=1)]
    return table.infer_objects()


def format_value(value: Any) -> str:
    """A table cell: ``-`` for a missing value, thousands separated for large numbers, 3-4 significant
    decimals otherwise (what the printed table, ``comparison.md`` and ``report.html`` show)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10 and v.is_integer():  # counts (optimizer steps, requests)
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


_cell = format_value

_COUNT_KEYS = ("optimizer_steps", "iterations", "seed", "weight_syncs", "cost_off_grid_queries",
               "kv_blocks_per_instance", "num_gpus", "num_instances")
_COUNT_PREFIXES = ("num_", "status_", "workload_num_", "train_tasks_", "train_queued", "train_deferred",
                   "finetune_aborted", "decode_waits")


def format_metric(metric: str, value: Any) -> str:
    """:func:`format_value`, with counts (optimizer steps, requests, ...) shown as whole numbers and FLOP
    rates in three significant digits (``2.92e+15``)."""
    if str(metric).endswith("flops_per_s"):
        try:
            v = float(value)
        except (TypeError, ValueError):
            return format_value(value)
        return f"{v:.3g}" if math.isfinite(v) and v != 0 else format_value(value)
    if str(metric) in _COUNT_KEYS or str(metric).startswith(_COUNT_PREFIXES):
        try:
            v = float(value)
        except (TypeError, ValueError):
            return format_value(value)
        if math.isfinite(v) and v.is_integer():
            return f"{int(v):,}"
    return format_value(value)


#: with more runs than this the printed table turns around: one line per run, metrics as columns
MAX_RUNS_AS_COLUMNS = 6


def format_table(table: pd.DataFrame, corner: str = "metric") -> str:
    """Fixed-width text of a :func:`comparison_table` (what the sweep prints at its end); ``corner``
    names the row labels (``run`` for a transposed table). Run names of several words (``lemix
    rate_scale=2``) are stacked over header lines, one word a line, so that a column is as wide as its
    longest word or value, not its whole name."""
    by_column = corner == "run"     # a transposed table: the metrics are its columns
    cells = [[format_metric(table.columns[j] if by_column else name, v) for j, v in enumerate(row)]
             for name, row in zip(table.index, table.itertuples(index=False))]
    heads = [[str(c)] if by_column else str(c).split() or [""] for c in table.columns]
    depth = max((len(h) for h in heads), default=1)
    heads = [[""] * (depth - len(h)) + h for h in heads]      # bottom-aligned
    first = max([len(corner), *(len(str(i)) for i in table.index)])
    widths = [max(max(len(w) for w in h), *(len(r[j]) for r in cells)) if cells else max(len(w) for w in h)
              for j, h in enumerate(heads)]
    lines = [(corner if d == depth - 1 else "").ljust(first) + "".join(f"  {h[d]:>{w}}" for h, w in zip(heads, widths))
             for d in range(depth)]
    for name, row in zip(table.index, cells):
        lines.append(str(name).ljust(first) + "".join(f"  {v:>{w}}" for v, w in zip(row, widths)))
    return "\n".join(lines)


def _markdown(table: pd.DataFrame, df: pd.DataFrame) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    cols = [esc(str(c)) for c in table.columns]
    lines = [f"# Comparison of {len(df)} runs: {df.attrs.get('multirun_dir', '')}".rstrip(": "), "",
             "| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in zip(table.index, table.itertuples(index=False)):
        lines.append(f"| {esc(str(name))} | " + " | ".join(esc(format_metric(name, v)) for v in row) + " |")
    lines += ["", "| run | job | overrides | directory |", "|---|---:|---|---|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {esc(str(r.label))} | {r.job} | {esc(str(r.overrides)) or '-'} | {esc(str(r.run_dir))} |")
    incomplete = df.attrs.get("incomplete") or []
    if incomplete:
        lines += ["", f"Incomplete jobs (no summary.json, left out): {', '.join(incomplete)}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ report
def write_report(multirun_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write ``comparison.csv`` (all runs, all summary keys), ``comparison.md`` (the side-by-side table),
    with ``plots`` the comparison plots (:data:`PLOT_FILES`; the Pareto and training-progress plots only
    when some run trains) and, last, ``report.html`` (all of it, the runs' configs, cost tables and own
    plots in one self-contained page) into ``multirun_dir``.

    Each file is written atomically; a plot skipped this time is removed if an earlier report left one.
    Returns the paths written.
    """
    return _write_report(load_runs(multirun_dir), Path(multirun_dir), plots)


#: name, drawing function (in comparison_plots), title, how to read it, why it is skipped when it draws nothing
_PLOTS = (
    (
        "comparison_pareto.png", "pareto", "SLO attainment vs training throughput (Pareto)",
        ("One numbered point per run (the legend names them). Right is better (more requests within both "
         "the TTFT and TPOT SLOs; the axis stops at 1, all of them, and the shaded band past it cannot be "
         "reached); up is better (more training tokens per second). The red staircase is the Pareto front:"
         " the runs no other run beats on both; a run below or left of it is dominated."),
        ("No run in this sweep trains (training=none everywhere): there is no training throughput to trade"
         " SLO attainment against, so there is no Pareto plot."),
    ),
    (
        "comparison_latency_cdf.png", "latency_cdfs", "Latency CDFs",
        ("Share of finished requests (y) whose time to first token (left) or time per output token (right)"
         " is at most x. Further left and higher is better; the gap at the top is the tail (p99 is where a"
         " curve crosses 0.99)."),
        None,
    ),
    (
        "comparison_utilization.png", "utilization_timelines", "GPU utilisation over time",
        ("Mean over each run's GPUs of the fraction of each sampling interval they were busy. Higher means"
         " more of the hardware is working; it says nothing by itself about whether the work met its SLO."),
        None,
    ),
    (
        "comparison_training.png", "training_progress", "Training progress",
        ("Training tokens (left) and optimizer steps (right), summed over all of a run's trainers, over "
         "simulated time; steeper is faster training. Flat stretches are times no step finished (serving "
         "took the GPUs, or the training data ran out)."),
        "No training records: no run in this sweep trains (or their training.parquet files are missing).",
    ),
)


def _write_report(df: pd.DataFrame, root: Path, plots: bool) -> list[Path]:
    from simcolo.metrics.report_html import Plot, render, write_html

    from simcolo.metrics.ranking import ranking_across_interference, ranking_markdown

    paths = [root / "comparison.csv", root / "comparison.md"]
    table = comparison_table(df)
    ranking = ranking_across_interference(df)
    with atomic_path(paths[0]) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(_markdown(table, df) + ("" if ranking is None else "\n" + ranking_markdown(ranking)))
    if ranking is not None:
        with atomic_path(root / RANKING_FILE) as tmp:
            ranking.to_csv(tmp, index=False)
        paths.append(root / RANKING_FILE)
    else:
        (root / RANKING_FILE).unlink(missing_ok=True)   # an earlier report's ranking would contradict this one
    drawn: list[Plot] | None = None
    if plots:
        from simcolo.metrics import comparison_plots

        drawn = []
        for name, func, title, how, skipped in _PLOTS:
            path = root / name
            fig = getattr(comparison_plots, func)(df, path)
            if fig is None:
                path.unlink(missing_ok=True)     # a plot an earlier report drew would contradict this one
                drawn.append(Plot(title, how, skipped=skipped))
            else:
                paths.append(path)
                drawn.append(Plot(title, how, png=path.read_bytes()))
    html_path = root / "report.html"
    write_html(html_path, render(df, table, drawn, format_metric, files=[p.name for p in paths], ranking=ranking))
    paths.append(html_path)
    return paths


def _report(multirun_dir: str | Path, plots: bool, quiet: bool) -> list[Path]:
    from simcolo.metrics.comparison_plots import short_labels

    with warnings.catch_warnings():
        if not quiet:  # the incomplete jobs are named in the table's title line instead
            warnings.simplefilter("ignore", IncompleteRunsWarning)
        df = load_runs(multirun_dir)
    paths = _write_report(df, Path(multirun_dir), plots)
    if not quiet:
        incomplete = df.attrs["incomplete"]
        print(f"\ncomparison of {len(df)} run{'s' if len(df) != 1 else ''} in {multirun_dir}"
              + (f" ({len(incomplete)} incomplete jobs left out: {', '.join(incomplete)})" if incomplete else "")
              + ":")
        table = comparison_table(df)
        table.columns = short_labels(df)   # as the plots name the runs: `lemix rate_scale=2`
        if table.shape[1] <= MAX_RUNS_AS_COLUMNS:
            print(format_table(table))
        else:   # a large sweep: a line per run reads better than a column per run
            print(format_table(table.T, corner="run"))
        from simcolo.metrics.ranking import ranking_across_interference, verdict

        ranking = ranking_across_interference(df)
        if ranking is not None:
            print("\n" + verdict(ranking))
            print(ranking.assign(holds=ranking["holds"].map({True: "yes", False: "NO"})).to_string(index=False))
        print(f"comparison: {', '.join(str(p) for p in paths)}")
        print(f"report: {Path(multirun_dir) / 'report.html'} (self-contained: open it in a browser)")
    return paths


class ComparisonCallback(_HydraCallback):
    """Hydra callback: at the end of every multirun, write the comparison report (``comparison.csv``,
    ``comparison.md``, the plots and the self-contained ``report.html``) into the sweep directory and
    print the side-by-side table (unless ``metrics.quiet``).

    Registered by ``conf/hydra/callbacks/compare.yaml``. Hydra turns an exception raised here into a
    warning, so a report that cannot be written never fails the sweep. A sweep stopped by a failed job
    never reaches ``on_multirun_end``: run ``python -m simcolo.metrics.comparison <sweep dir>`` then.
    """

    def __init__(self, plots: bool = True) -> None:
        self.plots = bool(plots)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        quiet = bool(OmegaConf.select(config, "metrics.quiet", default=False))
        _report(str(config.hydra.sweep.dir), self.plots, quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simcolo.metrics.comparison DIR [--no-plots]``: the report of a finished sweep (``DIR``
    relative to the working directory)."""
    args = list(sys.argv[1:] if argv is None else argv)
    dirs = [a for a in args if a != "--no-plots"]
    if len(dirs) != 1:
        print("usage: python -m simcolo.metrics.comparison MULTIRUN_DIR [--no-plots]", file=sys.stderr)
        return 2
    try:
        _report(dirs[0], plots="--no-plots" not in args, quiet=False)
    except (NoRunsError, ValueError) as exc:
        print(f"simcolo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
