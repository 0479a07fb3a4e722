"""``python -m calibrate.refine RUN [RUN ...] --out DIR``: cost tables fitted to what live runs measured.

Every replay (``python -m simcolo.replay``) logs each serving iteration it ran, with its batch, its
wall-clock time and the tables' prediction for it (``iterations.parquet``), and the measured / predicted
time of its training work (``summary.json``: ``replay_train_time_over_table``). This module fits corrected
tables from those logs -- the way to close the loop on a real deployment: calibrate, replay (or serve),
refine, simulate again -- and it is also how ``python -m calibrate`` fits its tables to the engine's own
iterations (``calibrate/engine_run.py``).

The fit, per kind of iteration (``prefill``: prompts only; ``decode``: decodes only; iterations with
training beside them and mixed ones are not fitted, but mixed ones are evaluated), is one scale: the
fitted iterations' measured time over the tables' prediction for them. A prefill that starts an idle
instance counts from its request's arrival (``requests.parquet``): the engine's dispatch and thread
wake-up (0.4-1 ms on the 2-core CPU, 5-10 % of a tiny-model TTFT) is then part of the prefill's cost, as
the simulator, which starts it at the arrival, can see it (means of TTFT and TPOT are sums
of iteration times, so the total is what must be right; see :func:`fit_law` for why no shape term).
Every latency of the table is multiplied by it, which keeps the kernel sweep's shape where the runs never
went. Training tables (``train_stage`` for full-parameter runs, ``lora_step`` for LoRA ones) are scaled
by the median of the runs' training ratios. The iterations that ran with training beside them refine the
interference table: each kind's plain co-run slowdown beside the training kind that ran is multiplied by
their measured time over what the refined solo law times the table's slowdown predicts (the replay's own
prediction of them), and kept at least 1; SM-partition rows are left as measured.

Held-out error: iterations are split into alternating blocks of ``--block-s`` seconds of each run; the
law is fitted on one half and evaluated on the other, both ways. For each kind it reports the error of
the total time (``|sum predicted - sum measured| / sum measured``, what mean TTFT / TPOT inherit) and the
median per-iteration error, before (the runs' own tables) and after (the refined ones); training,
with two runs or more, leaves one run out at a time. The same two halves, each fitted on its own, give
each kind's *split-half scales* (``halves``): a machine that kept its speed through the runs gives two
close scales; far apart, it changed speed while they ran (:func:`unsteady`; the calibration's engine run
is repeated then). ``refine.json`` in DIR holds all of it.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from simcolo.costs.cost_model import CostModel
from simcolo.costs.interference_table import UNPARTITIONED, InterferenceTable
from simcolo.costs.interp import OffGridWarning
from simcolo.costs.schema import METADATA_FILE
from simcolo.costs.tables import read_metadata
from simcolo.errors import SimcoloError, TableError

KINDS = ("prefill", "decode")
TRAIN_TABLES = {"full": "train_stage", "lora": "lora_step"}


class RefineError(SimcoloError):
    """A run directory or table directory that cannot be refined from."""


@dataclass
class RunLog:
    path: Path
    iterations: pd.DataFrame            # iterations.parquet with a `kind` column
    tables: Path                        # the tables the run predicted with
    train_table: str | None             # train_stage | lora_step | None (no training)
    train_ratio: float = math.nan       # measured / predicted training time with serving idle


@dataclass
class Law:
    """``measured ~ scale * predicted`` for one kind of iteration."""
    scale: float = 1.0
    iterations: int = 0

    def __call__(self, x):
        return self.scale * np.asarray(x, float)


@dataclass
class Fit:
    laws: dict[str, Law] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)   # table -> factor
    train_from: dict[str, str] = field(default_factory=dict)   # table -> the table whose factor it took
    # (kind_a, kind_b) -> factor on the co-run slowdown of kind_a beside training kind_b (plain co-run)
    corun: dict[tuple[str, str], float] = field(default_factory=dict)


# --------------------------------------------------------------------------------- reading runs

def iteration_kind(df: pd.DataFrame) -> pd.Series:
    p, d = df.prefill_seqs > 0, df.decode_seqs > 0
    return pd.Series(np.where(p & d, "mixed", np.where(p, "prefill", "decode")), index=df.index)


def read_run(path: str | Path, tables: str | Path | None = None) -> RunLog:
    """A replay's directory: its iteration log, its summary and the tables it ran on (its config's
    ``costs.path``, or ``tables``)."""
    path = Path(path)
    it_file, summary_file = path / "iterations.parquet", path / "summary.json"
    for f in (it_file, summary_file):
        if not f.is_file():
            raise RefineError(f"{path}: no {f.name}; expected the directory of a live replay "
                              "(python -m simcolo.replay ... hydra.run.dir=DIR)")
    df = pd.read_parquet(it_file)
    need = ("prefill_seqs", "prefill_tokens", "decode_seqs", "kv_tokens", "start_s", "end_s", "training_beside")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise RefineError(f"{it_file}: lacks column(s) {missing}; expected a replay's iteration log")
    df = df.assign(kind=iteration_kind(df))
    df["wake_s"] = wake_up(df, pd.read_parquet(path / "requests.parquet")) if (path / "requests.parquet").is_file() \
        else 0.0
    df["measured_s"] = df.end_s - df.start_s + df.wake_s
    summary = json.loads(summary_file.read_text())
    cfg_file = path / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    if tables is None:
        given = ((cfg or {}).get("costs") or {}).get("path")
        if not given:
            raise RefineError(f"{path}: cannot tell which tables the run used ({cfg_file} names no costs.path); "
                              "name them with --tables DIR")
        tables = Path(given)
    tables = Path(tables)
    if not (tables / METADATA_FILE).is_file():
        raise RefineError(f"{path}: its tables {tables} are not a cost-table directory (no {METADATA_FILE}); "
                          "name them with --tables DIR")
    kind = ((cfg or {}).get("training") or {}).get("kind", "none")
    return RunLog(path, df, tables, TRAIN_TABLES.get(kind),
                  float(summary.get("replay_train_time_over_table", math.nan)))


def wake_up(iterations: pd.DataFrame, requests: pd.DataFrame) -> np.ndarray:
    """Per iteration, the time between the arrival of a request at an idle instance and the start of the
    prefill iteration that admits it (0 for the rest): the engine's dispatcher and thread wake-up, which
    the simulator, starting that prefill at the arrival, would otherwise never see. It is counted as part of
    that prefill iteration's time."""
    out = np.zeros(len(iterations))
    if not {"arrival_s", "prefill_instance"} <= set(requests.columns) or not len(requests):
        return out
    pos = {ix: i for i, ix in enumerate(iterations.index)}
    for inst, its in iterations.groupby("instance", sort=False):
        its = its.sort_values("start_s")
        arrivals = np.sort(requests.arrival_s[requests.prefill_instance == inst].to_numpy(float))
        prev_end = -np.inf
        for ix, r in zip(its.index, its.itertuples(index=False)):
            if r.prefill_seqs > 0 and r.decode_seqs == 0:
                lo = np.searchsorted(arrivals, prev_end, side="right")   # the first arrival while idle
                if lo < len(arrivals) and arrivals[lo] <= r.start_s:
                    out[pos[ix]] = r.start_s - arrivals[lo]
            prev_end = r.end_s
    return out


# --------------------------------------------------------------------------------- predicting

def predict(cost: CostModel, df: pd.DataFrame) -> np.ndarray:
    """The tables' solo latency of every iteration, by the simulator's own lookups (off-grid queries, e.g.
    a two-token prompt below the grid, extrapolate as in the simulation, without its warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffGridWarning)
        return _predict(cost, df)


def _predict(cost: CostModel, df: pd.DataFrame) -> np.ndarray:
    out = np.empty(len(df))
    for i, r in enumerate(df.itertuples(index=False)):
        if r.decode_seqs == 0:
            out[i] = cost.prefill_s(r.prefill_tokens, r.prefill_seqs)
        elif r.prefill_seqs == 0:
            out[i] = cost.decode_s(r.decode_seqs, r.kv_tokens)
        else:
            out[i] = cost.mixed_s(r.prefill_tokens, r.prefill_seqs, r.decode_seqs, r.kv_tokens)
    return out


# --------------------------------------------------------------------------------- fitting

def fit_law(predicted: np.ndarray, measured: np.ndarray) -> Law:
    """The scale that makes the fitted iterations' predicted time add up to their measured time.

    Decision: one scale per kind, no shape term. A live iteration's time is bimodal (straight after
    another, or after the thread waited: 1.0x and 1.8x the table for the same decode batch on the 2-core
    CPU), and an exponent fitted to such data (measured ~ c * predicted ** k) swung from 0.75 to 1.25 between
    runs of one machine, which
    would move the tables' far corners, where the runs never went, by 2x."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    ok = (predicted > 0) & (measured > 0)
    predicted, measured = predicted[ok], measured[ok]
    if len(predicted) == 0:
        return Law()
    return Law(float(measured.sum() / predicted.sum()), len(predicted))


def fit(runs: list[RunLog], base_predictions: list[np.ndarray], other_training: bool = False,
        interference=None) -> Fit:
    """The laws from the solo prefill and decode iterations of ``runs`` (``base_predictions[i]``: the
    base tables' prediction of each of run i's iterations) and the training factors; ``other_training``:
    a training table no run exercised takes the factor of the one they did (see :func:`refine`); with the
    base ``interference`` table, the factors on its plain co-run slowdowns (:func:`_fit_corun`)."""
    out = Fit()
    for kind in KINDS:
        pred, meas = [], []
        for run, p in zip(runs, base_predictions):
            m = (run.iterations.kind == kind).to_numpy() & ~run.iterations.training_beside.to_numpy(bool)
            pred.append(p[m])
            meas.append(run.iterations.measured_s.to_numpy()[m])
        law = fit_law(np.concatenate(pred) if pred else np.empty(0), np.concatenate(meas) if meas else np.empty(0))
        if law.iterations:
            out.laws[kind] = law
    for table in set(TRAIN_TABLES.values()):
        ratios = [r.train_ratio for r in runs if r.train_table == table and math.isfinite(r.train_ratio)
                  and r.train_ratio > 0]
        if ratios:
            out.train[table] = float(np.median(ratios))
    if other_training and len(out.train) == 1:
        (measured, factor), = out.train.items()
        for table in sorted(set(TRAIN_TABLES.values()) - {measured}):
            out.train[table] = factor
            out.train_from[table] = measured
    if interference is not None:
        _fit_corun(out, runs, base_predictions, interference, other_training)
    return out


#: the interference table's training kind beside serving, by the training table a run used
BESIDE = {"train_stage": "train", "lora_step": "lora"}


def _fit_corun(out: Fit, runs: list[RunLog], base_predictions: list[np.ndarray], interference,
               other_training: bool) -> None:
    """The factor on each kind's plain co-run slowdown: the runs' iterations with training beside them,
    measured over what the refined solo law times the table's slowdown predicts (the replay's own
    prediction of them). ``other_training``: the training kind the runs did not run takes it too."""
    for kind, law in out.laws.items():
        by_beside: dict[str, list[float]] = {}
        for run, p in zip(runs, base_predictions):
            beside = BESIDE.get(run.train_table)
            if beside is None:
                continue
            m = (run.iterations.kind == kind).to_numpy() & run.iterations.training_beside.to_numpy(bool)
            if not m.any():
                continue
            try:
                slowdown = interference.slowdown(kind, beside, None)[0]
            except TableError:
                continue
            acc = by_beside.setdefault(beside, [0.0, 0.0])
            acc[0] += float(run.iterations.measured_s.to_numpy()[m].sum())
            acc[1] += float(law.scale * p[m].sum() * slowdown)
        for beside, (meas, pred) in by_beside.items():
            if pred > 0:
                out.corun[(kind, beside)] = meas / pred
        if other_training and len(by_beside) == 1:
            (beside, _), = by_beside.items()
            for other in sorted(set(BESIDE.values()) - {beside}):
                if (kind, beside) in out.corun:
                    out.corun[(kind, other)] = out.corun[(kind, beside)]


# --------------------------------------------------------------------------------- writing tables

def write_refined(base_dir: Path, f: Fit, out: Path, provenance: dict) -> None:
    """``base_dir`` copied to ``out`` with prefill and decode mapped through their laws and the training
    tables scaled; metadata says how (key ``refined``)."""
    base_dir, out = Path(base_dir), Path(out)
    if out.resolve() == base_dir.resolve():
        raise RefineError(f"--out {out} is the base tables' directory; write the refined tables elsewhere")
    meta = read_metadata(base_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns(".progress.jsonl", "engine_run", "kernel",
                                                                  "report_*.png"))
    files = meta["tables"]
    for kind, law in f.laws.items():
        path = tmp / files[kind]
        df = pd.read_csv(path)
        lat = df.latency_s.to_numpy(float)
        new = law(lat)
        df["latency_std_s"] = df.latency_std_s * np.where(lat > 0, new / lat, 1.0)
        df["latency_s"] = new
        df.to_csv(path, index=False, float_format="%.6e", lineterminator="\n")
    for table, factor in f.train.items():
        if table in files:
            path = tmp / files[table]
            df = pd.read_csv(path)
            df["latency_s"] *= factor
            df["latency_std_s"] *= factor
            df.to_csv(path, index=False, float_format="%.6e", lineterminator="\n")
    if f.corun and "interference" in files:
        path = tmp / files["interference"]
        df = pd.read_csv(path)
        for (kind_a, kind_b), factor in f.corun.items():
            m = (df.kind_a == kind_a) & (df.kind_b == kind_b) & df.method.isin(UNPARTITIONED)
            df.loc[m, "slowdown_a"] = np.maximum(1.0, df.loc[m, "slowdown_a"] * factor)
            df.loc[m, "latency_a_s"] = df.loc[m, "latency_a_alone_s"] * df.loc[m, "slowdown_a"]
        df.to_csv(path, index=False, float_format="%.6e", lineterminator="\n")
    meta["refined"] = {
        **provenance,
        "laws": {k: {"scale": v.scale, "iterations": v.iterations} for k, v in f.laws.items()},
        "train_factors": dict(f.train),
        "train_factors_from": dict(f.train_from),
        "corun_factors": {f"{a} beside {b}": v for (a, b), v in f.corun.items()},
        "rule": "latency_s x scale (prefill, decode); training tables x factor; plain co-run slowdown_a x "
                "factor, at least 1 (calibrate/refine.py)",
    }
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    CostModel.load(tmp)          # refuses anything the simulator would refuse, before it is in place
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


# --------------------------------------------------------------------------------- held-out error

def _errors(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    if len(meas) == 0 or meas.sum() <= 0:
        return {"iterations": 0, "total_rel_err": math.nan, "median_rel_err": math.nan}
    return {"iterations": int(len(meas)), "total_rel_err": float(abs(pred.sum() - meas.sum()) / meas.sum()),
            "median_rel_err": float(np.median(np.abs(pred - meas) / meas))}


def held_out(runs: list[RunLog], base_predictions: list[np.ndarray], block_s: float, work: Path
             ) -> tuple[dict, dict]:
    """Error of the base and the refined tables on iterations the refinement did not see: alternating
    ``block_s`` blocks of each run, fitted on one half and evaluated on the other, both ways. Also returns
    the split-half scales, the laws those two fits found: ``{kind: {"scales": [even blocks, odd blocks],
    "iterations": [n, n]}}`` for each kind fitted in both halves."""
    per_kind = {k: {"before": ([], []), "after": ([], [])} for k in (*KINDS, "mixed")}
    laws = {}                     # half -> the laws fitted on it (the fold that holds the other half out)
    for fold in (0, 1):
        train_runs, train_pred, test = [], [], []
        for run, p in zip(runs, base_predictions):
            blocks = (np.floor(run.iterations.start_s.to_numpy() / block_s).astype(int) % 2)
            tr, te = blocks != fold, blocks == fold
            train_runs.append(RunLog(run.path, run.iterations[tr], run.tables, run.train_table, run.train_ratio))
            train_pred.append(p[tr])
            test.append((run, run.iterations[te], p[te]))
        f = fit(train_runs, train_pred)
        laws[1 - fold] = f.laws
        for i, (run, df, p) in enumerate(test):
            solo = ~df.training_beside.to_numpy(bool)
            refined_dir = work / f"fold{fold}_run{i}"
            write_refined(run.tables, f, refined_dir, {"fold": fold})
            after = predict(CostModel.load(refined_dir), df)
            shutil.rmtree(refined_dir, ignore_errors=True)
            meas = df.measured_s.to_numpy()
            for kind in per_kind:
                m = solo & (df.kind.to_numpy() == kind)
                per_kind[kind]["before"][0].append(p[m])
                per_kind[kind]["before"][1].append(meas[m])
                per_kind[kind]["after"][0].append(after[m])
                per_kind[kind]["after"][1].append(meas[m])
    out = {}
    for kind, d in per_kind.items():
        res = {w: _errors(np.concatenate(d[w][0]), np.concatenate(d[w][1])) for w in ("before", "after")}
        if res["before"]["iterations"]:
            out[kind] = res
    train_runs = [r for r in runs if r.train_table and math.isfinite(r.train_ratio) and r.train_ratio > 0]
    if len(train_runs) >= 2:
        before, after = [], []
        for i, r in enumerate(train_runs):
            others = [o.train_ratio for j, o in enumerate(train_runs) if j != i and o.train_table == r.train_table]
            if not others:
                continue
            before.append(abs(1.0 / r.train_ratio - 1.0))            # predicted / measured - 1
            after.append(abs(float(np.median(others)) / r.train_ratio - 1.0))
        if before:
            out["train"] = {"before": {"runs": len(before), "median_rel_err": float(np.median(before))},
                            "after": {"runs": len(after), "median_rel_err": float(np.median(after))}}
    halves = {k: {"scales": [laws[0][k].scale, laws[1][k].scale],
                  "iterations": [laws[0][k].iterations, laws[1][k].iterations]}
              for k in KINDS if k in laws[0] and k in laws[1]}
    return out, halves


#: a half with fewer iterations of a kind than this says nothing about the machine's speed
STEADY_MIN_ITERATIONS = 20


def _judged(halves: dict):
    """(kind, halves, ratio of the larger scale to the smaller) of each kind with at least
    ``STEADY_MIN_ITERATIONS`` iterations in each half."""
    for kind, h in halves.items():
        if min(h["iterations"]) >= STEADY_MIN_ITERATIONS:
            lo, hi = sorted(h["scales"])
            yield kind, h, hi / lo if lo > 0 else math.inf


def unsteady(halves: dict, max_ratio: float) -> list[str]:
    """The kinds whose split-half scales (:func:`held_out`) are more than ``max_ratio`` apart, each
    with at least ``STEADY_MIN_ITERATIONS`` iterations a half, as readable lines (empty: steady)."""
    return [f"{kind} {h['scales'][0]:.2f}x vs {h['scales'][1]:.2f}x ({h['iterations'][0]} and "
            f"{h['iterations'][1]} iterations)" for kind, h, ratio in _judged(halves) if ratio > max_ratio]


def half_ratio(halves: dict) -> float:
    """The largest ratio between the two halves' scales of any kind :func:`unsteady` judges (1: none)."""
    return max((ratio for _, _, ratio in _judged(halves)), default=1.0)


# --------------------------------------------------------------------------------- the command

def refine(run_dirs: list[str | Path], out: str | Path, tables: str | Path | None = None,
           block_s: float = 2.0, quiet: bool = False, other_training: bool = False) -> dict:
    """Fit refined tables from ``run_dirs`` into ``out``; returns (and writes to ``out/refine.json``)
    the fit and the held-out errors. ``other_training``: when the runs trained one kind of job only, the
    other kind's table (``lora_step`` or ``train_stage``) is scaled by the same factor -- the calibration's
    engine run does this: it trains one kind, and on the CPU what slows training in the engine (a thread
    beside serving, the dispatcher, the GIL) slows both kinds alike (a LoRA replay's training ran 1.4-1.6x
    its hot-loop table where the full-parameter factor was 1.4-1.5x; left alone, the finetune policies'
    training came out 35-39 % too fast). Off for deployment logs: refine what ran."""
    runs = [read_run(d, tables) for d in run_dirs]
    bases = {r.tables.resolve() for r in runs}
    if len(bases) > 1:
        raise RefineError(f"the runs used different tables ({sorted(map(str, bases))}); refine runs of one "
                          "calibration at a time, or name the base with --tables DIR")
    base = runs[0].tables
    cost = CostModel.load(base)
    base_predictions = [predict(cost, r.iterations) for r in runs]
    if not any(((r.iterations.kind != "mixed") & ~r.iterations.training_beside.astype(bool)).any() for r in runs):
        raise RefineError(f"{', '.join(str(r.path) for r in runs)}: no serving iteration ran with nothing "
                          "beside it; nothing to fit prefill and decode tables to")
    out = Path(out)
    work = out.with_name(out.name + ".folds")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        errors, halves = held_out(runs, base_predictions, block_s, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        interference = InterferenceTable.load(base)
    except TableError:
        interference = None
    f = fit(runs, base_predictions, other_training, interference)
    provenance = {"base": str(Path(base).resolve()), "runs": [str(r.path.resolve()) for r in runs],
                  "held_out": errors, "halves": halves, "block_s": block_s}
    write_refined(base, f, out, provenance)
    report = {"out": str(out), **provenance,
              "laws": {k: vars(v) for k, v in f.laws.items()}, "train_factors": f.train,
              "train_factors_from": f.train_from,
              "corun_factors": {f"{a} beside {b}": v for (a, b), v in f.corun.items()}}
    (out / "refine.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not quiet:
        print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [f"refined tables: {report['out']} (base {report['base']}, {len(report['runs'])} run(s))"]
    for kind, law in report["laws"].items():
        lines.append(f"  {kind}: latency x {law['scale']:.3f} "
                     f"({law['iterations']} iterations)")
    for table, factor in report["train_factors"].items():
        lines.append(f"  {table}: latency x {factor:.3f}")
    lines.append(f"held-out error (alternating {report['block_s']:g} s blocks; before = the runs' tables, "
                 "after = refined):")
    lines.append(f"  {'kind':8s} {'iterations':>10s} {'total before':>13s} {'total after':>12s} "
                 f"{'median before':>14s} {'median after':>13s}")
    worst_before = worst_after = 0.0
    for kind, e in report["held_out"].items():
        b, a = e["before"], e["after"]
        if kind == "train":
            lines.append(f"  {'train':8s} {b['runs']:>7d} run {'':>13s} {'':>12s} {b['median_rel_err']:>14.1%} "
                         f"{a['median_rel_err']:>13.1%}")
            continue
        lines.append(f"  {kind:8s} {b['iterations']:>10d} {b['total_rel_err']:>13.1%} {a['total_rel_err']:>12.1%} "
                     f"{b['median_rel_err']:>14.1%} {a['median_rel_err']:>13.1%}")
        if kind in KINDS:
            worst_before, worst_after = max(worst_before, b["total_rel_err"]), max(worst_after, a["total_rel_err"])
    if report.get("halves"):
        lines.append("split-half scales (each half fitted on its own; far apart: the machine changed speed): "
                     + ", ".join(f"{k} {h['scales'][0]:.3f} / {h['scales'][1]:.3f}" for k, h in report["halves"].items()))
    lines.append(f"heldout_total_rel_err_before={worst_before:.4f} heldout_total_rel_err_after={worst_after:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m calibrate.refine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="replay directories (with iterations.parquet)")
    ap.add_argument("--out", required=True, metavar="DIR", help="where to write the refined tables")
    ap.add_argument("--tables", default=None, metavar="DIR",
                    help="the tables the runs predicted with (default: each run's costs.path)")
    ap.add_argument("--block-s", type=float, default=2.0,
                    help="length of the alternating blocks for the held-out split (default 2 s)")
    a = ap.parse_args(argv)
    if not a.block_s > 0:
        ap.error("--block-s must be > 0")
    try:
        refine(a.runs, a.out, a.tables, a.block_s)
    except SimcoloError as exc:
        print(f"calibrate.refine: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
