"""Fidelity runs: calibrate, then simulate and replay each policy on the same config, and compare.

    python -m simcolo.replay.fidelity --setting cpu_tiny --device cpu --out fidelity/cpu-tiny

For each policy it runs the commands a user would (``python -m calibrate``, ``simcolo``,
``python -m simcolo.replay``, ``python -m simcolo.compare``) as subprocesses, one at a time, so that
nothing else competes for the machine while it is being measured. Everything goes to ``--work``
(default: ``outputs/fidelity/<setting>``); the small results (each policy's ``compare.csv``, both
``summary.json`` files, the calibration's ``metadata.json``, and ``fidelity.csv`` / ``fidelity.md``
with every policy's rows) are copied to ``--out``, the folder the project commits.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from simcolo.paths import PROJECT_ROOT

#: per-policy overrides of the CPU setting: isolated serves on one "GPU" and trains on the other;
#: a co-located policy serves and trains on one
POLICY_OVERRIDES = {
    "isolated": ["cluster=cpu2", "policy.serving_gpus=1", "policy.sync_every=5"],
    "lemix": ["cluster=single"],
    "mix_rr": ["cluster=single"],
    "least_outstanding": ["cluster=single"],
}
#: the rows the issue's fidelity targets name
TARGET_ROWS = ("ttft_mean_s", "tpot_mean_s", "train_step_time_s", "train_tokens_per_s")


def _run(args: list[str], log: Path) -> None:
    print("$", " ".join(args), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"fidelity: command failed (exit {proc.returncode}); see {log}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="cpu_tiny", help="conf/fidelity/<setting>.yaml (default cpu_tiny)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--policies", default="isolated,lemix", help="comma-separated (default isolated,lemix)")
    ap.add_argument("--calibration", default=None, help="use this calibration instead of calibrating now")
    ap.add_argument("--work", default=None, help="where every output goes (default outputs/fidelity/<setting>)")
    ap.add_argument("--out", default=None, help="copy the small results here (e.g. fidelity/cpu-tiny)")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for the simulation and the replay")
    a = ap.parse_args(argv)
    work = Path(a.work or PROJECT_ROOT / "outputs" / "fidelity" / a.setting).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "fidelity.log"
    py = sys.executable
    common = [f"+fidelity={a.setting}", *a.overrides]
    cal = Path(a.calibration).resolve() if a.calibration else work / "calibration"
    if a.calibration is None:
        model = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("model=")), None)
        from simcolo.configs import load_config

        model = model or load_config(common).model.name
        shutil.rmtree(cal, ignore_errors=True)
        _run([py, "-m", "calibrate", f"model={model}", f"device={a.device}", f"out={cal}", "progress_bar=false"], log)
    frames = []
    for policy in a.policies.split(","):
        extra = [f"policy={policy}", *POLICY_OVERRIDES.get(policy, []), f"costs.path={cal}"]
        sim, rep = work / policy / "sim", work / policy / "replay"
        for d in (sim, rep):
            shutil.rmtree(d, ignore_errors=True)
        _run([py, "-m", "simcolo", *common, *extra, f"hydra.run.dir={sim}"], log)
        _run([py, "-m", "simcolo.replay", *common, *extra, f"device={a.device}", f"hydra.run.dir={rep}"], log)
        _run([py, "-m", "simcolo.compare", str(sim), str(rep)], log)
        df = pd.read_csv(rep / "compare.csv")
        df.insert(0, "policy", policy)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(work / "fidelity.csv", index=False)
    md = _markdown(table, a)
    (work / "fidelity.md").write_text(md)
    print(md)
    if a.out:
        _publish(work, Path(a.out), cal, a.policies.split(","))


def _markdown(table: pd.DataFrame, a) -> str:
    rows = table[table.metric.isin(TARGET_ROWS + ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s",
                                                  "slo_attainment", "request_throughput_rps",
                                                  "inference_loss_mean"))]
    lines = [f"Fidelity, setting `{a.setting}` on `{a.device}` (`python -m simcolo.replay.fidelity --setting "
             f"{a.setting} --device {a.device}`):", "",
             "| policy | metric | simulated | measured | rel. error |", "|---|---|---:|---:|---:|"]
    for r in rows.itertuples():
        lines.append(f"| {r.policy} | {r.metric} | {r.simulated:.6g} | {r.measured:.6g} | {r.rel_err:.1%} |")
    return "\n".join(lines) + "\n"


def _publish(work: Path, out: Path, cal: Path, policies: list[str]) -> None:
    out = out if out.is_absolute() else PROJECT_ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("fidelity.csv", "fidelity.md"):
        shutil.copy(work / name, out / name)
    if (cal / "metadata.json").exists():
        shutil.copy(cal / "metadata.json", out / "calibration_metadata.json")
    for policy in policies:
        (out / policy).mkdir(exist_ok=True)
        shutil.copy(work / policy / "replay" / "compare.csv", out / policy / "compare.csv")
        shutil.copy(work / policy / "sim" / "summary.json", out / policy / "sim_summary.json")
        shutil.copy(work / policy / "replay" / "summary.json", out / policy / "replay_summary.json")
    print(f"fidelity: results in {out}")


if __name__ == "__main__":
    main()
