"""Fidelity runs: calibrate, then simulate and replay each policy on the same config, and compare.

    python -m simcolo.replay.fidelity --setting cpu_tiny --device cpu --policies all
    python -m simcolo.replay.fidelity ... --publish fidelity/cpu-tiny     # also update the committed report

For each policy, one at a time (nothing else should compete for the machine meanwhile), it runs the
commands a user would, as subprocesses in the working directory:

1. ``python -m calibrate`` — tables measured just before (``<out>/<policy>/calibration``): the kernel
   sweep fitted to a short live run of the engine (``calibrate/engine_run.py``; on the CPU, for isolated
   and harli, in the policy's own two-"GPU" layout: :func:`engine_layout`); or, with ``--tables DIR``, one
   calibration made beforehand for every policy;
2. ``simcolo`` on those tables;
3. ``python -m simcolo.replay`` ``--repeats`` times, each followed by ``python -m simcolo.compare``;
4. ``python -m calibrate measure=[prefill,decode,train_stage] engine_run.enabled=false`` again
   (``calibration_after``), compared with the first calibration's kernel sweep: how far the machine
   itself drifted while replaying (a shared VM can change speed by tens of percent within minutes; that
   bounds what any comparison on it can show). Not with ``--tables``.

The report (``fidelity.csv``, ``fidelity.md``) gives, per policy and metric, the simulated value, the
median measured value over the repeats and its relative error, the smallest and largest relative
error of single repeats, whether the target rows are within ``--target`` (mean TTFT and TPOT and the
training step time or tokens/s; on CUDA also p90 TTFT and TPOT), the machine's load average around each
policy's replays (``load.json``) and the calibration drift. No table is rescaled after the fact: the
simulation runs on the calibration as made. A diagnostic, labelled as such, follows: the replays' own
measured / predicted ratios, and the simulation re-run on tables rescaled by them ("in-situ tables"),
which isolates the simulator's own error from the tables'.

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
import os
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


#: policies whose CPU calibration runs its engine fit in the policy's own two-"GPU" layout (``engine_layout``).
#: Measured in pairs on this project's 2-core VM, the same hour, mean TTFT / TPOT / training step error
#: against the one-device fit: isolated 20/22/9 % and 7/11/5 % against 26/38/4 %; harli 13/14/25 % and
#: 35/8/23 % against 61/17/44 %. static_share and flexllm measured worse that way (49/73/49 % against
#: 50/46/18 %, 61/14/24 % against 43/5/15 %; one pair each, why is not established) and keep the
#: one-device fit. Single replays on that VM differ by up to tens of percent: these are indications.
OWN_LAYOUT_CALIBRATION = ("isolated", "harli")


def engine_layout(policy: str, device: str) -> list[str]:
    """Calibrate overrides for a policy's own calibration: on the CPU, a policy of
    ``OWN_LAYOUT_CALIBRATION`` has the engine run that fits its tables (``calibrate/engine_run.py``) in its
    own layout on two "GPUs"; none otherwise (the calibration profile's one co-located node).

    Why: the CPU's "GPUs" are threads of one host, and they slow each other. Iterations of one replay
    instance that overlapped the other's ran ~3-3.7x their prediction, ~0.8-1.1x alone (two instances
    on two "GPUs", this project's 2-core VM), which a one-device run never sees. The run keeps the
    profile's synthetic workload and training settings: it is not the trace replayed."""
    if device != "cpu" or policy not in OWN_LAYOUT_CALIBRATION:
        return []
    from omegaconf import OmegaConf

    from simcolo.paths import CONF_DIR

    profile = OmegaConf.load(CONF_DIR / "calibrate.yaml").engine_run.profiles.cpu.layout
    # the shipped profile's policy, cluster and training kind give way to the policy's (LoRA for harli)
    kept = [o for o in profile if o.split("=")[0] not in ("policy", "cluster", "training")]
    layout = ",".join(f'"{o}"' for o in [*policy_overrides(policy), *kept])
    return [f"engine_run.profiles.cpu.layout=[{layout}]"]


#: the rows the issue's fidelity targets name, then the rest of the report
TARGET_ROWS = ("ttft_mean_s", "tpot_mean_s", "train_step_time_s", "train_tokens_per_s")
REPORT_ROWS = TARGET_ROWS + ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "slo_attainment",
                             "request_throughput_rps", "inference_loss_mean")
DRIFT_TABLES = ("prefill", "decode", "train_stage")
#: measured / predicted time of the very iterations and training work a replay ran (its summary)
IN_SITU = ("replay_prefill_time_over_table", "replay_decode_time_over_table", "replay_train_time_over_table")
IN_SITU_SUFFIX = " (in-situ tables)"


def _load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (what else competed for it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:          # not available on this platform
        return []


def _run(args: list[str], log: Path) -> None:
    print("$", " ".join(args), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=False)   # in the working dir, as typed
    if proc.returncode != 0:
        sys.exit(f"fidelity: command failed (exit {proc.returncode}); see {log}")


def rescale_tables(src: Path, dst: Path, ratios: dict[str, float]) -> None:
    """Copy calibration ``src`` to ``dst`` with prefill, decode and training latencies multiplied by the
    in-situ ratios (``replay_<table>_time_over_table``; a missing or NaN ratio leaves a table as is). The
    training ratio scales both training tables: a run trains one job, and its simulation reads only that
    job's table (``train_stage`` for full training, ``lora_step`` for the finetune layouts)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".progress.jsonl"))
    for table, key in (("prefill", "prefill"), ("decode", "decode"), ("train_stage", "train"),
                       ("lora_step", "train")):
        r = ratios.get(f"replay_{key}_time_over_table", math.nan)
        path = dst / f"{table}.csv"
        if path.exists() and math.isfinite(r) and r > 0:
            df = pd.read_csv(path)
            df["latency_s"] *= r
            df.to_csv(path, index=False)


def calibration_drift(before: Path, after: Path) -> dict[str, float]:
    """Median over the points both calibrations measured of latency_after / latency_before - 1, per table
    (``before/kernel``, the sweep before its engine fit, where the first calibration has one)."""
    if (before / "kernel").is_dir():
        before = before / "kernel"
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
REPORT_FILES = ("fidelity.csv", "fidelity_runs.csv", "fidelity.md", "drift.json", "load.json")


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
    ap.add_argument("--tables", default=None, metavar="DIR",
                    help="one calibration, made beforehand, for every policy (no per-policy calibration and no "
                         "drift measurement): for a short run, e.g. on a GPU lent for minutes")
    ap.add_argument("--target", type=float, default=None,
                    help="the relative error the target rows must stay within (default 0.15 on cpu, 0.05 on cuda)")
    ap.add_argument("--no-in-situ", action="store_true",
                    help="skip the in-situ diagnostic (one more simulation per policy)")
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
    tables = None
    if a.tables is not None:
        tables = Path(a.tables).expanduser().resolve()
        if not (tables / "metadata.json").is_file():
            ap.error(f"--tables {a.tables}: {tables} is not a cost-table directory (no metadata.json)")
    work.mkdir(parents=True, exist_ok=True)
    _record_run(work, a, argv)
    print(f"fidelity: writing to {work}", flush=True)
    log = work / "fidelity.log"
    rows, drift, load = [], {}, {}
    for policy in policies:
        pdir = work / policy
        shutil.rmtree(pdir, ignore_errors=True)
        cal, after = pdir / "calibration", pdir / "calibration_after"
        calibrate = [py, "-m", "calibrate", *config_dir, f"model={model}", f"device={a.device}", "progress_bar=false",
                     *engine_layout(policy, a.device), *a.calibrate_override]
        if tables is None:
            _run([*calibrate, f"out={cal}"], log)
        else:   # its provenance beside the policy's results, as a calibration of its own would be
            cal.mkdir(parents=True)
            for name in ("metadata.json", "refine.json"):
                if (tables / name).exists():
                    shutil.copy(tables / name, cal / name)
            cal = tables
        extra = [*policy_overrides(policy), f"costs.path={cal}"]
        _run([py, "-m", "simcolo", *config_dir, *common, *extra, "metrics.quiet=true",
              f"hydra.run.dir={pdir / 'sim'}"], log)
        load[policy] = {"before": _load_average()}
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
        load[policy]["after"] = _load_average()
        if tables is None:
            _run([*calibrate, f"out={after}", f"measure=[{','.join(DRIFT_TABLES)}]", "engine_run.enabled=false"], log)
            drift[policy] = calibration_drift(cal, after)
        if a.no_in_situ:
            continue
        # diagnostic only: the same simulation on tables rescaled by what the replays measured in situ;
        # what is left is the simulator's own error (scheduling, interference, queueing), not the tables'
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
        drift = {**{p: d for p, d in kept.items() if p not in policies}, **drift}
        kept = json.loads((work / "load.json").read_text()) if (work / "load.json").exists() else {}
        load = {**{p: d for p, d in kept.items() if p not in policies}, **load}
    write_report(work, runs, drift, a, load)
    if publish is not None:
        publish_report(work, publish)
    print(f"fidelity: report in {work / 'fidelity.md'}")


def write_report(work: Path, runs: pd.DataFrame, drift: dict, a, load: dict | None = None) -> None:
    """The run's report from every replay's comparison rows (``runs``), the calibration drift and the
    machine's load averages."""
    runs.to_csv(work / "fidelity_runs.csv", index=False)
    table = _aggregate(runs)
    table.to_csv(work / "fidelity.csv", index=False)
    (work / "drift.json").write_text(json.dumps(drift, indent=2))
    (work / "load.json").write_text(json.dumps(load or {}, indent=2))
    md = _markdown(table, drift, a, load or {})
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


def target_rows(table: pd.DataFrame, device: str) -> dict[str, list[str]]:
    """Per policy, the report rows its target names: mean TTFT and TPOT (on CUDA also their p90) and the
    training step time where the policy has one, else its training tokens/s (none without training)."""
    out = {}
    for policy, g in table.groupby("policy", sort=False):
        have = set(g.metric)
        rows = ["ttft_mean_s", "tpot_mean_s"] + (["ttft_p90_s", "tpot_p90_s"] if device == "cuda" else [])
        if device == "cuda" and "train_tokens_per_s" in have:
            rows.append("train_tokens_per_s")
        elif "train_step_time_s" in have:
            rows.append("train_step_time_s")
        elif "train_tokens_per_s" in have:
            rows.append("train_tokens_per_s")
        out[policy] = [r for r in rows if r in have]
    return out


def target_verdicts(table: pd.DataFrame, device: str, target: float) -> dict[str, list[str]]:
    """Per policy, the target rows whose error exceeds ``target`` (empty: the policy meets it)."""
    err = table.set_index(["policy", "metric"]).rel_err
    return {p: [m for m in rows if not err[(p, m)] <= target] for p, rows in target_rows(table, device).items()}


def _target(a) -> float:
    return a.target if a.target is not None else (0.05 if a.device == "cuda" else 0.15)


def _markdown(table: pd.DataFrame, drift: dict, a, load: dict) -> str:
    repeats = sorted(set(table.repeats))
    target = _target(a)
    checked = target_rows(table, a.device)
    cal = (f"one calibration made beforehand (`--tables`)" if getattr(a, "tables", None) else
           "a calibration made just before each policy (`python -m calibrate`: the kernel sweep fitted to a short "
           "live run of the engine, for isolated and harli on the CPU in the policy's own two-GPU layout)")
    lines = [(f"Setting `{a.setting}` on `{a.device}`, {'/'.join(map(str, repeats))} replays per policy "
              f"(`python -m simcolo.replay.fidelity --setting {a.setting} --device {a.device} --repeats {a.repeats}`). "
              f"*simulated*: on {cal}, as made: no table is rescaled after the fact. *target*: "
              f"{target:.0%} on the rows marked."), "",
             "| policy | metric | simulated | measured (median) | rel. error | single replays | target |",
             "|---|---|---:|---:|---:|---:|:---:|"]
    for r in table[table.metric.isin(REPORT_ROWS)].itertuples():
        mark = ("yes" if r.rel_err <= target else "**no**") if r.metric in checked.get(r.policy, []) else ""
        lines.append(f"| {r.policy} | {r.metric} | {r.simulated:.4g} | {r.measured_median:.4g} | {r.rel_err:.1%} | "
                     f"{r.rel_err_min:.0%}–{r.rel_err_max:.0%} | {mark} |")
    verdicts = target_verdicts(table, a.device, target)
    met = [p for p, bad in verdicts.items() if not bad]
    lines += ["", f"Target {target:.0%} ({', '.join(sorted({m for rows in checked.values() for m in rows}))}): met by "
                  f"{len(met)} of {len(verdicts)} policies" + (f" ({', '.join(met)})" if met else "") + "."]
    for p, bad in verdicts.items():
        if bad:
            lines.append(f"- {p}: not within {target:.0%} on {', '.join(bad)}")
    if load:
        lines += ["", "Machine load around each policy's replays (1, 5, 15 min load averages, before → after):", ""]
        for p, l in load.items():
            lines.append(f"- {p}: {'/'.join(map(str, l.get('before', [])))} → {'/'.join(map(str, l.get('after', [])))}")
    in_situ = table.set_index(["policy", "metric"])
    ratios = table[table.metric.isin(IN_SITU)]
    if len(ratios):
        lines += ["", "**Diagnostic only** (not the fidelity figures above). In the replays themselves, measured / "
                      "predicted time of the same batches and tasks (median over replays; a serving iteration with "
                      "training beside it is predicted with the interference table's slowdown, as the simulator "
                      "does; training counts work that ran alone: with serving idle, or, time-sliced, less the time "
                      "held), and the error of the same simulation "
                      "re-run on tables rescaled by those ratios (\"in-situ tables\": what is left is the "
                      "simulator's own error):", ""]
        for policy, g in ratios.groupby("policy", sort=False):
            rescaled = [f"{m} {in_situ.loc[(policy, m + IN_SITU_SUFFIX), 'rel_err']:.1%}" for m in checked.get(policy, [])
                        if (policy, m + IN_SITU_SUFFIX) in in_situ.index]
            lines.append(f"- {policy}: " + ", ".join(f"{r.metric.removeprefix('replay_').removesuffix('_time_over_table')}"
                                                     f" {r.measured_median:.2f}x" for r in g.itertuples())
                         + (f"; in-situ tables: {', '.join(rescaled)}" if rescaled else ""))
    if drift:
        lines += ["", "Calibration drift while replaying (the same kernel points measured again after the replays):", ""]
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
        calibration = src / "calibration" if (src / "calibration").is_dir() else None
        if calibration is not None:
            shutil.copy(calibration / "metadata.json", dst / "calibration_metadata.json")
            if (calibration / "refine.json").exists():
                shutil.copy(calibration / "refine.json", dst / "calibration_engine_fit.json")
        replays = sorted((d for d in src.glob("replay_*") if (d / "compare.csv").exists()),
                         key=lambda d: int(d.name.removeprefix("replay_")))
        for rep in replays:
            k = rep.name.removeprefix("replay_")
            shutil.copy(rep / "compare.csv", dst / f"compare_{k}.csv")
            shutil.copy(rep / "summary.json", dst / f"replay_{k}_summary.json")
    print(f"fidelity: published to {out}")


if __name__ == "__main__":
    main()
