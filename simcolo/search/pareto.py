"""The Pareto front of a search: the runs no other run beats on every objective.

:func:`non_dominated` is the rule; :func:`write_pareto` reads a sweep directory's runs (their
``summary.json`` and overrides), writes ``pareto.csv`` (the front, best first, with each run's overrides
and objectives) and ``pareto.png`` (every run, the front drawn through its points), and returns the
recommendation: the run with the most of the first objective among those meeting the SLO target.

By hand, for a finished search (or one stopped by a failed job)::

    python -m simcolo.search.pareto multirun/<date>/<time> [--slo-target 0.99]
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from simcolo.metrics.io import atomic_path
from simcolo.search.objectives import axis_label, scale

PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
#: columns pareto.csv always has besides the objectives (NaN where a run lacks one)
EXTRA = ("train_mfu", "train_job", "num_gpus", "goodput_rps", "ttft_p99_s", "tpot_p99_s")


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b``: at least as good on every objective and better on one (both given as
    *larger is better*)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (runs x objectives) that no other row dominates.
    Rows with a NaN are never on the front; equal rows are both on it."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != len(directions):
        raise ValueError(f"points must be runs x {len(directions)} objectives, got shape {pts.shape}")
    sign = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    s = pts * sign
    valid = ~np.isnan(s).any(axis=1)
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        others = s[valid]
        better_eq = (others >= s[i]).all(axis=1)
        strictly = (others > s[i]).any(axis=1)
        if (better_eq & strictly).any():
            mask[i] = False
    return mask


def _overrides(run_dir: str) -> list[str]:
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = yaml.safe_load(path.read_text()) or []
    return [str(o) for o in loaded]


def _param_columns(override_lists: list[list[str]]) -> pd.DataFrame:
    """One column per override key that differs between runs (the searched parameters)."""
    rows = []
    for ovs in override_lists:
        row = {}
        for o in ovs:
            if "=" in o:
                k, v = o.split("=", 1)
                row[k.lstrip("+~")] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    varying = [c for c in df.columns if df[c].nunique(dropna=False) > 1]
    return df[varying]


def runs_table(sweep_dir: str | Path, objectives: Sequence[str]) -> pd.DataFrame:
    """Every completed run of the sweep: ``job``, ``policy``, the objectives, :data:`EXTRA`, the searched
    parameters (one column per varying override key) and ``overrides``; sorted by job."""
    from simcolo.metrics.comparison import load_runs

    df = load_runs(sweep_dir)
    ovs = [_overrides(d) for d in df["run_dir"]]
    out = pd.DataFrame({"job": df["job"].astype("int64"),
                        "policy": df["policy"] if "policy" in df.columns else ""})
    for k in list(objectives) + [k for k in EXTRA if k not in objectives]:
        out[k] = df[k] if k in df.columns else math.nan
    params = _param_columns(ovs)
    for c in params.columns:
        if c not in out.columns:
            out[c] = params[c].values
    out["overrides"] = [" ".join(o) for o in ovs]
    out.attrs["incomplete"] = df.attrs.get("incomplete", [])
    return out.sort_values("job").reset_index(drop=True)


def pareto_front(runs: pd.DataFrame, objectives: Sequence[str], directions: Sequence[str]) -> pd.DataFrame:
    """The non-dominated runs, best first on the first objective (then the second, ..., then job)."""
    mask = non_dominated(runs[list(objectives)].to_numpy(dtype=float), directions)
    front = runs[mask].copy()
    keys = list(objectives) + ["job"]
    asc = [d == "minimize" for d in directions] + [True]
    return front.sort_values(keys, ascending=asc, kind="mergesort").reset_index(drop=True)


def recommend(front: pd.DataFrame, objectives: Sequence[str], directions: Sequence[str],
              slo_target: float | None) -> pd.Series | None:
    """The front's best run on the first objective among those with ``slo_attainment >= slo_target``
    (None when none meets it). Without a target: the front's first run."""
    ok = front
    if slo_target is not None and "slo_attainment" in front.columns:
        ok = front[front["slo_attainment"] >= slo_target]
    if ok.empty:
        return None
    return ok.sort_values([objectives[0], "job"], ascending=[directions[0] == "minimize", True],
                          kind="mergesort").iloc[0]


def _short(row: pd.Series) -> str:
    """A run's policy and layout in a few characters (``harli 2p+6d``, ``isolated 4 serve + 2x2``)."""
    def get(key):
        v = row.get(key) if key in row.index else None
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    bits = [str(row["policy"])]
    S, s = get("training.stages"), get("policy.serving_gpus")
    p, d = get("policy.prefill_instances"), get("policy.decode_instances")
    if s is not None:
        bits.append(f"{s} serve + train S={S}" if S is not None else f"{s} serve")
    elif S is not None:
        bits.append(f"S={S}")
    if p is not None and d is not None:
        bits.append(f"{p}p+{d}d")
    return " ".join(bits)


def plot_pareto(runs: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[str], directions: Sequence[str],
                path: Path, slo_target: float | None = None, title: str = "") -> Path:
    """Every run (coloured by policy), the front joined in order and labelled with its policies and
    layouts, the SLO target as a dashed line; axes name their unit and the better direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = objectives[0], objectives[1]
    sx, sy = scale(x), scale(y)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    policies = sorted(runs["policy"].astype(str).unique())
    cmap = plt.get_cmap("tab10")
    for i, p in enumerate(policies):
        r = runs[runs["policy"].astype(str) == p]
        ax.scatter(r[x] * sx, r[y] * sy, s=30, alpha=0.6, color=cmap(i % 10), label=p, zorder=2)
    f = front.sort_values([x, y])
    # the front's staircase: the edge of the region its runs dominate (both objectives maximised)
    style = "steps-pre" if list(directions[:2]) == ["maximize", "maximize"] else "default"
    ax.plot(f[x] * sx, f[y] * sy, "-", color="black", lw=1.2, zorder=3, drawstyle=style, label="Pareto front")
    ax.scatter(f[x] * sx, f[y] * sy, s=80, facecolors="none", edgecolors="black", lw=1.5, zorder=4)
    xmin, xmax = float(runs[x].min() * sx), float(runs[x].max() * sx)
    for (xv, yv), grp in f.groupby([x, y], sort=False):
        labels = list(dict.fromkeys(_short(r) for _, r in grp.iterrows()))
        text = "; ".join(labels) + f" (job {', '.join(str(j) for j in grp['job'])})"
        right = xmax > xmin and (xv * sx - xmin) > 0.6 * (xmax - xmin)
        ax.annotate(text, (xv * sx, yv * sy), textcoords="offset points", xytext=(-6 if right else 6, -12),
                    ha="right" if right else "left", fontsize=7.5, zorder=5)
    if slo_target is not None and y == "slo_attainment":
        ax.axhline(slo_target * sy, ls="--", color="grey", lw=1, label=f"SLO target {slo_target:g}")
    ax.set_xlabel(axis_label(x, directions[0], "\u2192" if directions[0] == "maximize" else "\u2190"))
    ax.set_ylabel(axis_label(y, directions[1], "\u2191" if directions[1] == "maximize" else "\u2193"))
    ax.set_title(title or f"Pareto front: {len(front)} of {len(runs)} runs")
    if x == "train_flops_per_s":
        fig.text(0.01, 0.01, "model FLOPs per training token: 6N full-parameter, 4N + 6N_adapters LoRA "
                 "(N: weights that multiply activations; recomputation not counted)", fontsize=7, color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_pareto(sweep_dir: str | Path, objectives: Sequence[str], directions: Sequence[str],
                 slo_target: float | None = None, plot: bool = True):
    """Write ``pareto.csv`` (and ``pareto.png`` with ``plot`` and two or more objectives) into
    ``sweep_dir``; returns (all runs, the front, the recommended run or None)."""
    root = Path(sweep_dir)
    runs = runs_table(root, objectives)
    front = pareto_front(runs, objectives, directions)
    table = front.copy()
    if slo_target is not None and "slo_attainment" in table.columns:
        pos = table.columns.get_loc("overrides")
        table.insert(pos, "meets_slo_target", table["slo_attainment"] >= slo_target)
    with atomic_path(root / PARETO_CSV) as tmp:
        table.to_csv(tmp, index=False)
    if plot and len(objectives) >= 2:
        plot_pareto(runs, front, objectives, directions, root / PARETO_PNG, slo_target)
    return runs, front, recommend(front, objectives, directions, slo_target)


def describe(runs: pd.DataFrame, front: pd.DataFrame, best: pd.Series | None, objectives: Sequence[str],
             slo_target: float | None, root: Path) -> str:
    """The lines a search prints at its end."""
    lines = [(f"search: {len(front)} of {len(runs)} runs on the Pareto front of "
              f"{' and '.join(objectives)}: {root / PARETO_CSV}")]
    incomplete = runs.attrs.get("incomplete") or []
    if incomplete:
        lines.append(f"search: {len(incomplete)} job(s) without summary.json left out: {', '.join(incomplete)}")
    for _, r in front.iterrows():
        vals = ", ".join(f"{k}={r[k]:.4g}" for k in objectives)
        lines.append(f"  job {r['job']:>3}  {vals}  {r['overrides']}")
    target = "" if slo_target is None else f" with slo_attainment >= {slo_target:g}"
    if best is None:
        lines.append(f"search: no run meets the SLO target{target}")
    else:
        lines.append(f"search: most {objectives[0]}{target}: job {best['job']} ({best['overrides']}): "
                     + ", ".join(f"{k}={best[k]:.4g}" for k in list(objectives) + ["train_mfu"] if k in best.index))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simcolo.search.pareto DIR [--slo-target X] [--objectives a,b] [--directions max,max]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m simcolo.search.pareto", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--objectives", default="train_flops_per_s,slo_attainment")
    p.add_argument("--directions", default="maximize,maximize")
    p.add_argument("--slo-target", type=float, default=None)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    objectives = a.objectives.split(",")
    directions = [("maximize" if d.startswith("max") else "minimize") for d in a.directions.split(",")]
    from simcolo.metrics.comparison import NoRunsError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs, front, best = write_pareto(a.sweep_dir, objectives, directions, a.slo_target, not a.no_plot)
    except (NoRunsError, ValueError) as exc:
        print(f"simcolo: error: {exc}", file=sys.stderr)
        return 2
    print(describe(runs, front, best, objectives, a.slo_target, Path(a.sweep_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
