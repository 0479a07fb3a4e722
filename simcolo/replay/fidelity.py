"""Fidelity runs: calibrate, then simulate and replay each policy on the same config, and compare.

    python -m simcolo.replay.fidelity --setting cpu_tiny --device cpu --policies all
    python -m simcolo.replay.fidelity ... --publish fidelity/cpu-tiny     # also update the committed report

For each policy, one at a time (nothing else should compete for the machine meanwhile), it runs the
commands a user would, as subprocesses in the working directory:

1. ``python -m calibrate`` — tables measured just before (``<out>/<policy>/calibration``);
2. ``simcolo`` on those tables;
3. ``python -m simcolo.replay`` ``--repeats`` times, each followed by ``python -m simcolo.compare``;
4. ``python -m calibrate measure=[prefill,decode,train_stage]`` again (``calibration_after``): how far
   the machine itself drifted while replaying (a shared VM can change speed by tens of percent
   within minutes; that bounds what any comparison on it can show).

The report (``fidelity.csv``, ``fidelity.md``) gives, per policy and metric, the simulated value, the
median measured value over the repeats and its relative error, the smallest and largest relative
error of single repeats, and the calibration drift.

Where it writes: everything goes to the run's own directory, ``--out`` (default: a new
``outputs/fidelity/<setting>/<date>_<time>`` under the working directory; an existing non-empty
directory is refused), marked by ``fidelity_run.json``. Nothing else is written unless asked:
``--publish DIR`` copies the small results (the report, each repeat's ``compare.csv``, the
``summary.json`` files, the calibrations' ``metadata.json`` and drift) into DIR, the folder the project
commits (``fidelity/cpu-tiny``). ``--add --out RUN`` re-measures the policies named into the earlier run
RUN, keeping its other policies' results, and rewrites RUN's report (``--publish`` then publishes all of
them).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd

from simcolo.compare import compare_runs, rel_err

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
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=False)   # in the working dir, as typed
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


#: marks a fidelity run's directory (``--out``): its setting, device and the commands that wrote it
RUN_FILE = "fidelity_run.json"
#: the report files a run writes and ``--publish`` copies
REPORT_FILES = ("fidelity.csv", "fidelity_runs.csv", "fidelity.md", "drift.json")


def default_out_dir(setting: str, now: datetime | None = None) -> Path:
    """A new run directory ``outputs/fidelity/<setting>/<date>_<time>`` under the working directory
    (``_2``, ``_3`` ... appended if a run started in the same second)."""
    base = Path("outputs") / "fidelity" / setting / (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}_{k}")
    return out.resolve()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m simcolo.replay.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="cpu_tiny",
                    help="the +fidelity=<setting> config: conf/fidelity/<setting>.yaml, or fidelity/<setting>.yaml "
                         "in --config-dir (default cpu_tiny)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--policies", default="isolated,lemix",
                    help="comma-separated, or all (default isolated,lemix)")
    ap.add_argument("--repeats", type=int, default=3, help="replays per policy (default 3; the median is reported)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="the run's directory, where every output goes (default: a new "
                         "outputs/fidelity/<setting>/<date>_<time> under the working directory); a new or empty "
                         "directory, except with --add")
    ap.add_argument("--add", action="store_true",
                    help="re-measure the policies named into the earlier run --out DIR, keeping its other "
                         "policies' results")
    ap.add_argument("--publish", default=None, metavar="DIR",
                    help="also copy the small results (report, summaries, comparisons) into DIR, e.g. the "
                         "committed fidelity/cpu-tiny; without it nothing outside --out is written")
    ap.add_argument("--config-dir", default=None, metavar="DIR",
                    help="a config directory of your own, passed to every command (Hydra's --config-dir)")
    ap.add_argument("--calibrate-override", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for both calibrations only (repeatable), e.g. threads=2 or gpu=h100-sxm")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)   # the old name of --out: refused below
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for the simulation and the replay")
    return ap


def _run_dir(a, ap: argparse.ArgumentParser) -> Path:
    """The run's directory (``--out``), checked: a new or empty one, or with ``--add`` an earlier run's."""
    if a.work is not None:
        ap.error("--work is now --out (the run's own directory); what --out did before, copying the small "
                 "results into a committed folder, is --publish DIR")
    if a.add:
        if a.out is None:
            ap.error("--add needs --out DIR: the earlier run to add the policies to")
        out = Path(a.out).expanduser().resolve()
        marker = out / RUN_FILE
        if not marker.exists():
            ap.error(f"--add --out {a.out}: {out} is not a fidelity run's directory (no {RUN_FILE}); a published "
                     "report (fidelity/cpu-tiny) is updated from a run with --publish")
        earlier = json.loads(marker.read_text())
        mismatch = {k: (earlier.get(k), getattr(a, k)) for k in ("setting", "device") if earlier.get(k) != getattr(a, k)}
        if mismatch:
            ap.error(f"--add: {out} is a run of " + ", ".join(f"--{k} {was}" for k, (was, _) in mismatch.items())
                     + "; one report compares one setting on one device")
        return out
    out = Path(a.out).expanduser().resolve() if a.out is not None else default_out_dir(a.setting)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        ap.error(f"--out {a.out}: {out} exists and is not empty; name a new directory (or, to re-measure some "
                 f"policies of that run, add --add; to update a committed report, --publish DIR)")
    return out


def _publish_dir(a, out: Path, ap: argparse.ArgumentParser) -> Path | None:
    if a.publish is None:
        return None
    dst = Path(a.publish).expanduser().resolve()
    if dst == out or dst.is_relative_to(out) or out.is_relative_to(dst) or (dst / RUN_FILE).exists():
        ap.error(f"--publish {a.publish}: {dst} is (or holds, or is inside) a run's directory; publish into a "
                 "folder of its own, e.g. fidelity/cpu-tiny")
    return dst


def _record_run(out: Path, a, argv: list[str]) -> None:
    marker = out / RUN_FILE
    run = json.loads(marker.read_text()) if marker.exists() else {"setting": a.setting, "device": a.device,
                                                                  "commands": []}
    run["commands"].append({"started": datetime.now().isoformat(timespec="seconds"), "argv": argv,
                            "cwd": str(Path.cwd())})
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n")
    tmp.replace(marker)


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    from simcolo.config.compose import load_config
    from simcolo.policies import POLICIES

    policies = sorted(POLICIES) if a.policies == "all" else a.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"--policies: unknown {unknown}; expected some of {sorted(POLICIES)} or all")
    work = _run_dir(a, ap)
    publish = _publish_dir(a, work, ap)
    py = sys.executable
    config_dir = []
    if a.config_dir is not None:
        cd = Path(a.config_dir).expanduser().resolve()
        if not cd.is_dir():
            ap.error(f"--config-dir {a.config_dir}: {cd} is not a directory")
        config_dir = [f"--config-dir={cd}"]
    common = [f"+fidelity={a.setting}", *a.overrides]
    model = load_config(common, config_dir=a.config_dir).model.name   # a bad setting fails here, before any run
    work.mkdir(parents=True, exist_ok=True)
    _record_run(work, a, argv)
    print(f"fidelity: writing to {work}", flush=True)
    log = work / "fidelity.log"
    rows, drift = [], {}
    for policy in policies:
        pdir = work / policy
        shutil.rmtree(pdir, ignore_errors=True)
        cal, after = pdir / "calibration", pdir / "calibration_after"
        calibrate = [py, "-m", "calibrate", *config_dir, f"model={model}", f"device={a.device}", "progress_bar=false",
                     *a.calibrate_override]
        _run([*calibrate, f"out={cal}"], log)
        extra = [*policy_overrides(policy), f"costs.path={cal}"]
        _run([py, "-m", "simcolo", *config_dir, *common, *extra, "metrics.quiet=true",
              f"hydra.run.dir={pdir / 'sim'}"], log)
        for k in range(1, a.repeats + 1):
            rep = pdir / f"replay_{k}"
            _run([py, "-m", "simcolo.replay", *config_dir, *common, *extra, f"device={a.device}",
                  "metrics.quiet=true", f"hydra.run.dir={rep}"], log)
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
        _run([py, "-m", "simcolo", *config_dir, *common, *extra[:-1], f"costs.path={corrected}", "metrics.quiet=true",
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
    write_report(work, runs, drift, a)
    if publish is not None:
        publish_report(work, publish)
    print(f"fidelity: report in {work / 'fidelity.md'}")


def write_report(work: Path, runs: pd.DataFrame, drift: dict, a) -> None:
    """The run's report from every replay's comparison rows (``runs``) and the calibration drift."""
    runs.to_csv(work / "fidelity_runs.csv", index=False)
    table = _aggregate(runs)
    table.to_csv(work / "fidelity.csv", index=False)
    (work / "drift.json").write_text(json.dumps(drift, indent=2))
    md = _markdown(table, drift, a)
    (work / "fidelity.md").write_text(md)
    print(md)


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
    lines = [(f"Setting `{a.setting}` on `{a.device}`, {'/'.join(map(str, repeats))} replays per policy "
              f"(`python -m simcolo.replay.fidelity --setting {a.setting} --device {a.device} --repeats {a.repeats}`). "
              f"*simulated*: on the calibration made just before; *in-situ tables*: the same simulation with the "
              f"prefill, decode and training tables rescaled by what the replays measured for the same work "
              f"(below), which leaves the simulator's own error."), "",
             ("| policy | metric | simulated | measured (median) | rel. error | single replays | "
              "rel. error, in-situ tables |"), "|---|---|---:|---:|---:|---:|---:|"]
    in_situ = table.set_index(["policy", "metric"])
    for r in table[table.metric.isin(REPORT_ROWS)].itertuples():
        key = (r.policy, r.metric + IN_SITU_SUFFIX)
        corrected = f"{in_situ.loc[key, 'rel_err']:.1%}" if key in in_situ.index else ""
        lines.append(f"| {r.policy} | {r.metric} | {r.simulated:.4g} | {r.measured_median:.4g} | {r.rel_err:.1%} | "
                     f"{r.rel_err_min:.0%}–{r.rel_err_max:.0%} | {corrected} |")
    lines += ["", ("In the replays themselves, measured / predicted time of the same batches and tasks (median over "
                   "replays; a serving iteration with training beside it is predicted with the interference table's "
                   "slowdown, as the simulator does; training counts work that ran with serving idle):"), ""]
    for policy, g in table[table.metric.isin(IN_SITU)].groupby("policy", sort=False):
        lines.append(f"- {policy}: " + ", ".join(f"{r.metric.removeprefix('replay_').removesuffix('_time_over_table')}"
                                                 f" {r.measured_median:.2f}x" for r in g.itertuples()))
    lines += ["", "Calibration drift while replaying (the same points measured again after the replays):", ""]
    for policy, d in drift.items():
        lines.append(f"- {policy}: " + ", ".join(f"{t} {v:+.1%}" for t, v in d.items()))
    return "\n".join(lines) + "\n"


def publish_report(work: Path, out: Path) -> None:
    """Copy a run's small results into ``out`` (the committed folder): the report files and, per policy in
    the report, its simulation's and every replay's summary, each replay's ``compare.csv`` and the
    calibration's metadata. Earlier published files of those policies are replaced, and policy folders
    of an earlier report that this one no longer has are removed, so that the folder is this report."""
    policies = sorted(set(pd.read_csv(work / "fidelity_runs.csv").policy))
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        shutil.copy(work / name, out / name)
    for stale in sorted(out.iterdir()):   # only what an earlier publish wrote: <policy>/sim_summary.json
        if stale.is_dir() and stale.name not in policies and (stale / "sim_summary.json").exists():
            shutil.rmtree(stale)
            print(f"fidelity: removed {stale} (not in this report)")
    for policy in policies:
        src, dst = work / policy, out / policy
        dst.mkdir(exist_ok=True)
        for old in [*dst.glob("compare_*.csv"), *dst.glob("replay_*_summary.json")]:
            old.unlink()
        shutil.copy(src / "sim" / "summary.json", dst / "sim_summary.json")
        shutil.copy(src / "calibration" / "metadata.json", dst / "calibration_metadata.json")
        replays = sorted((d for d in src.glob("replay_*") if (d / "compare.csv").exists()),
                         key=lambda d: int(d.name.removeprefix("replay_")))
        for rep in replays:
            k = rep.name.removeprefix("replay_")
            shutil.copy(rep / "compare.csv", dst / f"compare_{k}.csv")
            shutil.copy(rep / "summary.json", dst / f"replay_{k}_summary.json")
    print(f"fidelity: published to {out}")


if __name__ == "__main__":
    main()
