"""Fidelity runs: calibrate, then simulate and replay each policy on the same config, and compare.

    python -m simcolo.replay.fidelity --setting cpu_tiny --device cpu --out fidelity/cpu-tiny

For each policy, one at a time (nothing else should compete for the machine meanwhile), it runs the
commands a user would, as subprocesses:

1. ``python -m calibrate`` — tables measured just before (``<work>/<policy>/calibration``);
2. ``simcolo`` on those tables;
3. ``python -m simcolo.replay`` ``--repeats`` times, each followed by ``python -m simcolo.compare``;
4. ``python -m calibrate measure=[prefill,decode,train_stage]`` again (``calibration_after``): how far
   the machine itself drifted while replaying (a shared VM can change speed by tens of percent
   within minutes; that bounds what any comparison on it can show).

The report (``fidelity.csv``, ``fidelity.md``) gives, per policy and metric, the simulated value, the
median measured value over the repeats and its relative error, the smallest and largest relative
error of single repeats, and the calibration drift. Everything goes to ``--work`` (default
``outputs/fidelity/<setting>``); with ``--out`` the small results (the report, each repeat's
``compare.csv``, the ``summary.json`` files, the calibrations' ``metadata.json`` and drift) are copied
there, the folder the project commits. ``--add`` re-measures the policies named into an existing ``--work``
report, keeping the others' results.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from simcolo.compare import compare_runs, rel_err
from simcolo.paths import PROJECT_ROOT

#: per-policy overrides of the CPU setting: isolated serves on one "GPU" and trains on the other; the
#: finetune policies prefill on one and decode + finetune on the other; the co-located pipeline and
#: routing policies serve (and train) on one
_FINETUNE = ["cluster=cpu2", "policy.prefill_instances=1", "policy.decode_instances=1", "policy.max_micro_batch=2"]
POLICY_OVERRIDES = {
    "isolated": ["cluster=cpu2", "policy.serving_gpus=1", "policy.sync_every=5"],
    "harli": _FINETUNE, "static_share": _FINETUNE, "flexllm": _FINETUNE,
}
DEFAULT_OVERRIDES = ["cluster=single"]


def policy_overrides(policy: str) -> list[str]:
    return [f"policy={policy}", *POLICY_OVERRIDES.get(policy, DEFAULT_OVERRIDES)]
#: the rows the issue's fidelity targets name, then the rest of the report
TARGET_ROWS = ("ttft_mean_s", "tpot_mean_s", "train_step_time_s", "train_tokens_per_s")
REPORT_ROWS = TARGET_ROWS + ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "slo_attainment",
                             "request_throughput_rps", "inference_loss_mean")
DRIFT_TABLES = ("prefill", "decode", "train_stage")
#: measured / predicted time of the very iterations and training work a replay ran (its summary)
IN_SITU = ("replay_prefill_time_over_table", "replay_decode_time_over_table", "replay_train_time_over_table")
IN_SITU_SUFFIX = " (in-situ tables)"


def _run(args: list[str], log: Path) -> None:
    print("$", " ".join(args), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"fidelity: command failed (exit {proc.returncode}); see {log}")


def rescale_tables(src: Path, dst: Path, ratios: dict[str, float]) -> None:
    """Copy calibration ``src`` to ``dst`` with prefill, decode and train_stage latencies multiplied by
    the in-situ ratios (``replay_<table>_time_over_table``; a missing or NaN ratio leaves a table as is)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".progress.jsonl"))
    for table, key in (("prefill", "prefill"), ("decode", "decode"), ("train_stage", "train")):
        r = ratios.get(f"replay_{key}_time_over_table", math.nan)
        path = dst / f"{table}.csv"
        if path.exists() and math.isfinite(r) and r > 0:
            df = pd.read_csv(path)
            df["latency_s"] *= r
            df.to_csv(path, index=False)


def calibration_drift(before: Path, after: Path) -> dict[str, float]:
    """Median over the points both calibrations measured of latency_after / latency_before - 1, per table."""
    out = {}
    for table in DRIFT_TABLES:
        a, b = before / f"{table}.csv", after / f"{table}.csv"
        if not (a.exists() and b.exists()):
            continue
        x, y = pd.read_csv(a), pd.read_csv(b)
        keys = [c for c in x.columns if c not in ("latency_s", "latency_std_s", "repeats", "peak_memory_bytes")]
        m = x.merge(y, on=keys, suffixes=("_before", "_after"))
        if len(m):
            out[table] = float((m.latency_s_after / m.latency_s_before).median() - 1.0)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="cpu_tiny", help="conf/fidelity/<setting>.yaml (default cpu_tiny)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--policies", default="isolated,lemix",
                    help="comma-separated, or all (default isolated,lemix)")
    ap.add_argument("--repeats", type=int, default=3, help="replays per policy (default 3; the median is reported)")
    ap.add_argument("--work", default=None, help="where every output goes (default outputs/fidelity/<setting>)")
    ap.add_argument("--out", default=None, help="copy the small results here (e.g. fidelity/cpu-tiny)")
    ap.add_argument("--add", action="store_true",
                    help="keep the other policies' results already in --work and add (or replace) these")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for the simulation and the replay")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    from simcolo.config.compose import load_config

    work = Path(a.work or PROJECT_ROOT / "outputs" / "fidelity" / a.setting).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "fidelity.log"
    py = sys.executable
    common = [f"+fidelity={a.setting}", *a.overrides]
    model = load_config(common).model.name
    from simcolo.policies import POLICIES

    policies = sorted(POLICIES) if a.policies == "all" else a.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"--policies: unknown {unknown}; expected some of {sorted(POLICIES)} or all")
    rows, drift = [], {}
    for policy in policies:
        pdir = work / policy
        shutil.rmtree(pdir, ignore_errors=True)
        cal, after = pdir / "calibration", pdir / "calibration_after"
        calibrate = [py, "-m", "calibrate", f"model={model}", f"device={a.device}", "progress_bar=false"]
        _run([*calibrate, f"out={cal}"], log)
        extra = [*policy_overrides(policy), f"costs.path={cal}"]
        _run([py, "-m", "simcolo", *common, *extra, "metrics.quiet=true", f"hydra.run.dir={pdir / 'sim'}"], log)
        for k in range(1, a.repeats + 1):
            rep = pdir / f"replay_{k}"
            _run([py, "-m", "simcolo.replay", *common, *extra, f"device={a.device}", "metrics.quiet=true",
                  f"hydra.run.dir={rep}"], log)
            _run([py, "-m", "simcolo.compare", str(pdir / "sim"), str(rep)], log)
            df = pd.read_csv(rep / "compare.csv")
            summary = json.loads((rep / "summary.json").read_text())
            in_situ = [(f"{key}", math.nan, summary[key], math.nan) for key in IN_SITU if key in summary]
            df = pd.concat([df, pd.DataFrame(in_situ, columns=df.columns)], ignore_index=True)
            df.insert(0, "repeat", k)
            df.insert(0, "policy", policy)
            rows.append(df)
        _run([*calibrate, f"out={after}", f"measure=[{','.join(DRIFT_TABLES)}]"], log)
        drift[policy] = calibration_drift(cal, after)
        # the same simulation on tables rescaled by what the replays measured in situ: what is left is
        # the simulator's own error (scheduling, interference, queueing), not the tables' or the machine's
        ratios = pd.concat(r for r in rows if r.policy.iloc[0] == policy)
        ratios = ratios[ratios.metric.isin(IN_SITU)].groupby("metric").measured.median().to_dict()
        corrected = pdir / "calibration_in_situ"
        rescale_tables(cal, corrected, ratios)
        _run([py, "-m", "simcolo", *common, *extra[:-1], f"costs.path={corrected}", "metrics.quiet=true",
              f"hydra.run.dir={pdir / 'sim_in_situ'}"], log)
        for k in range(1, a.repeats + 1):
            df = compare_runs(pdir / "sim_in_situ", pdir / f"replay_{k}")
            df.insert(0, "repeat", k)
            df.insert(0, "policy", policy)
            df["metric"] = df.metric + IN_SITU_SUFFIX
            rows.append(df)
    runs = pd.concat(rows, ignore_index=True)
    if a.add and (work / "fidelity_runs.csv").exists():   # re-measured policies replace their earlier rows
        earlier = pd.read_csv(work / "fidelity_runs.csv")
        runs = pd.concat([earlier[~earlier.policy.isin(policies)], runs], ignore_index=True)
        kept = json.loads((work / "drift.json").read_text()) if (work / "drift.json").exists() else {}
        drift = {**{p: d for p, d in kept.items() if p not in drift}, **drift}
    runs.to_csv(work / "fidelity_runs.csv", index=False)
    table = _aggregate(runs)
    table.to_csv(work / "fidelity.csv", index=False)
    (work / "drift.json").write_text(json.dumps(drift, indent=2))
    md = _markdown(table, drift, a)
    (work / "fidelity.md").write_text(md)
    print(md)
    if a.out:
        _publish(work, Path(a.out), sorted(set(runs.policy)), a.repeats)


def _aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Per policy and metric: the simulated value, the median measured over repeats, its relative
    error (as ``simcolo.compare`` computes it), and the range of single repeats' errors."""
    out = []
    for (policy, metric), g in runs.groupby(["policy", "metric"], sort=False):
        sim, meas = float(g.simulated.iloc[0]), float(g.measured.median())
        err = rel_err(sim, meas)
        out.append({"policy": policy, "metric": metric, "simulated": sim, "measured_median": meas,
                    "rel_err": err, "rel_err_min": float(g.rel_err.min()), "rel_err_max": float(g.rel_err.max()),
                    "repeats": len(g)})
    return pd.DataFrame(out)


def _markdown(table: pd.DataFrame, drift: dict, a) -> str:
    repeats = sorted(set(table.repeats))
    lines = [f"Setting `{a.setting}` on `{a.device}`, {'/'.join(map(str, repeats))} replays per policy "
             f"(`python -m simcolo.replay.fidelity --setting {a.setting} --device {a.device} --repeats {a.repeats}`). "
             f"*simulated*: on the calibration made just before; *in-situ tables*: the same simulation with the "
             f"prefill, decode and training tables rescaled by what the replays measured for the same work "
             f"(below), which leaves the simulator's own error.", "",
             "| policy | metric | simulated | measured (median) | rel. error | single replays | "
             "rel. error, in-situ tables |", "|---|---|---:|---:|---:|---:|---:|"]
    in_situ = table.set_index(["policy", "metric"])
    for r in table[table.metric.isin(REPORT_ROWS)].itertuples():
        key = (r.policy, r.metric + IN_SITU_SUFFIX)
        corrected = f"{in_situ.loc[key, 'rel_err']:.1%}" if key in in_situ.index else ""
        lines.append(f"| {r.policy} | {r.metric} | {r.simulated:.4g} | {r.measured_median:.4g} | {r.rel_err:.1%} | "
                     f"{r.rel_err_min:.0%}–{r.rel_err_max:.0%} | {corrected} |")
    lines += ["", "In the replays themselves, measured / predicted time of the same batches and tasks (median over "
              "replays; a serving iteration with training beside it is predicted with the interference table's "
              "slowdown, as the simulator does; training counts work that ran with serving idle):", ""]
    for policy, g in table[table.metric.isin(IN_SITU)].groupby("policy", sort=False):
        lines.append(f"- {policy}: " + ", ".join(f"{r.metric.removeprefix('replay_').removesuffix('_time_over_table')}"
                                                 f" {r.measured_median:.2f}x" for r in g.itertuples()))
    lines += ["", "Calibration drift while replaying (the same points measured again after the replays):", ""]
    for policy, d in drift.items():
        lines.append(f"- {policy}: " + ", ".join(f"{t} {v:+.1%}" for t, v in d.items()))
    return "\n".join(lines) + "\n"


def _publish(work: Path, out: Path, policies: list[str], repeats: int) -> None:
    out = out if out.is_absolute() else PROJECT_ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("fidelity.csv", "fidelity_runs.csv", "fidelity.md", "drift.json"):
        shutil.copy(work / name, out / name)
    for policy in policies:
        src, dst = work / policy, out / policy
        dst.mkdir(exist_ok=True)
        shutil.copy(src / "sim" / "summary.json", dst / "sim_summary.json")
        shutil.copy(src / "calibration" / "metadata.json", dst / "calibration_metadata.json")
        for k in range(1, repeats + 1):
            shutil.copy(src / f"replay_{k}" / "compare.csv", dst / f"compare_{k}.csv")
            shutil.copy(src / f"replay_{k}" / "summary.json", dst / f"replay_{k}_summary.json")
    print(f"fidelity: results in {out}")


if __name__ == "__main__":
    main()
