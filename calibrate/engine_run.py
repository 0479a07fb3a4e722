"""Calibration in the engine's conditions: the kernel tables fitted to a short live run of the engine.

A kernel timed in a hot loop of identical calls runs faster than the same batch inside the serving
engine, which alternates shapes and kernels, wakes its thread for each arrival, hands the GIL to the
request dispatcher and, with training beside it, shares the machine as a live deployment does. On the
2-core CPU the same batches took 1.1-1.9x the hot-loop time in the replays (decode straight after
another iteration: 1.03x; after the thread waited: 1.8x; a prefill after an idle gap: 1.5x). No order of
isolated kernel calls reproduces the dispatcher and the idle gaps; the engine itself does. So, after the
sweep, ``python -m calibrate``:

1. writes the sweep's tables to ``<out>/kernel`` (the shape of every table over its whole grid);
2. runs ``python -m simcolo.replay`` -- the engine's own code path, threads and all -- on a short
   synthetic workload (``engine_run.profiles.<profile>.workload``: Poisson arrivals with the Azure conversation trace's
   lengths) in the layout ``engine_run.profiles.<profile>.layout`` (CPU: one co-located node, serving and
   training threads of one process alternating as they do live; GPU: serving alone), into
   ``<out>/engine_run``;
3. fits the tables to that run's iterations with :mod:`calibrate.refine` (one scale per iteration kind,
   the training tables by the run's training ratio: the kind of job it trained, and the other kind by the
   same factor) and writes them to ``<out>``, the metadata saying
   so (key ``refined``, ``method``).

A run during which the machine changed speed (a shared VM can halve its speed for tens of seconds) would
fit the tables to that moment. Its two halves (alternating 2 s blocks, :func:`calibrate.refine.unsteady`)
then give scales more than ``engine_run.max_half_ratio`` apart, and the run is made again, up to
``engine_run.tries`` runs in all; the steadiest is kept (in ``<out>/engine_run``, the others beside it as
``engine_run.unsteady<i>``), and the metadata's ``engine_run`` lists every run's split-half scales.

``engine_run.enabled=false`` keeps the kernel tables as they are (the earlier behaviour).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from calibrate.context import CalibrationError
from calibrate.refine import half_ratio, refine, unsteady
from simcolo.costs.schema import METADATA_FILE
from simcolo.errors import ConfigError

KERNEL_DIR = "kernel"
RUN_DIR = "engine_run"


def settings(cfg: DictConfig, profile: str) -> dict | None:
    """``engine_run`` of the config, checked (None when disabled)."""
    e = cfg.get("engine_run")
    if e is None or not e.get("enabled", False):
        return None
    prof = (e.get("profiles") or {}).get(profile)
    if prof is None:
        raise ConfigError(f"engine_run.profiles.{profile}: missing; expected workload and layout lists of replay "
                          "overrides for this profile, or engine_run.enabled=false")
    out = {"config_dir": e.get("config_dir"), "timeout_s": float(e.get("timeout_s") or 900)}
    tries, ratio = e.get("tries", 1), e.get("max_half_ratio", math.inf)
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ConfigError(f"engine_run.tries={tries!r}; expected an integer >= 1 (runs made at most)")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
        raise ConfigError(f"engine_run.max_half_ratio={ratio!r}; expected a number >= 1 (how far apart the scales "
                          "fitted on the run's two halves may be)")
    out["tries"], out["max_half_ratio"] = tries, float(ratio)
    duration = e.get("duration_s")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0):
        raise ConfigError(f"engine_run.duration_s={duration!r}; expected seconds > 0 or null (the profile's)")
    for key in ("workload", "layout"):
        given = prof.get(key)
        values = list(OmegaConf.to_container(given)) if given is not None else None
        if values is None or any(not isinstance(o, str) or "=" not in o for o in values):
            raise ConfigError(f"engine_run.profiles.{profile}.{key}: {values!r}; expected a list of key=value "
                              "overrides of python -m simcolo.replay")
        out[key] = values
    if duration is not None:
        out["workload"].append(f"workload.duration_s={duration:g}")
    return out


def command(e: dict, model: str, gpu: str, device: str, threads: int | None, seed: int, tables: Path,
            run_dir: Path) -> list[str]:
    config_dir = [f"--config-dir={Path(e['config_dir']).expanduser().resolve()}"] if e["config_dir"] else []
    return [sys.executable, "-m", "simcolo.replay", *config_dir, f"model={model}", f"gpu={gpu}", *e["workload"],
            *e["layout"], f"costs.path={tables}", f"device={device}", f"seed={seed}",
            *([f"replay.cpu_threads={threads}"] if threads is not None else []), "metrics.quiet=true",
            "metrics.plots=false", f"hydra.run.dir={run_dir}"]


def calibrate_in_engine(out: Path, e: dict, model: str, gpu: str, device: str, threads: int | None,
                        seed: int) -> dict:
    """Steps 2 and 3 of the module docstring, on the kernel tables in ``out/kernel``; returns refine's
    report. The fitted tables replace the table files and metadata.json in ``out``."""
    out = Path(out)
    kernel, run_dir, fitted = out / KERNEL_DIR, out / RUN_DIR, out / ".fitted"
    for old in [run_dir, *out.glob(f"{RUN_DIR}.unsteady*")]:
        shutil.rmtree(old, ignore_errors=True)
    runs = []                     # (directory name, refine's report) of each unsteady run
    for i in range(1, e["tries"] + 1):
        _run_engine(e, model, gpu, device, threads, seed, kernel, run_dir)
        report = refine([run_dir], fitted, tables=kernel, quiet=True, other_training=True)
        shaky = unsteady(report["halves"], e["max_half_ratio"])
        if not shaky:
            break
        name = f"{RUN_DIR}.unsteady{i}"
        runs.append((name, report))
        print(f"calibrate: engine run {i} of at most {e['tries']} was unsteady: its two halves' scales are more than "
              f"{e['max_half_ratio']:g}x apart ({'; '.join(shaky)}): the machine changed speed while it ran; "
              + ("running it again" if i < e["tries"] else "keeping the steadiest run"), flush=True)
        shutil.rmtree(out / name, ignore_errors=True)
        run_dir.rename(out / name)
    else:   # every run unsteady: keep the steadiest, fitted again from where it now lies
        name, _ = min(runs, key=lambda r: half_ratio(r[1]["halves"]))
        (out / name).rename(run_dir)
        report = refine([run_dir], fitted, tables=kernel, quiet=True, other_training=True)
        runs = [r for r in runs if r[0] != name]
    for f in fitted.iterdir():
        if f.suffix in (".csv", ".json"):
            f.replace(out / f.name)
    shutil.rmtree(fitted)
    meta_path = out / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["method"] = (meta["method"] + " Then fitted to the engine's own iterations (calibrate/engine_run.py): "
                      f"a live run of the replay engine ({' '.join(e['workload'] + e['layout'])}), each "
                      "iteration kind's tables scaled so that their predictions of the run's iterations add up "
                      f"to the measured time (metadata `refined`; the sweep's own tables are in {KERNEL_DIR}/).")
    meta["engine_run"] = {
        "max_half_ratio": e["max_half_ratio"], "tries": e["tries"],
        "steady": not unsteady(report["halves"], e["max_half_ratio"]),
        "kept": {"dir": RUN_DIR, "halves": report["halves"]},
        "set_aside": [{"dir": name, "halves": r["halves"]} for name, r in runs]}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return report


def _run_engine(e: dict, model: str, gpu: str, device: str, threads: int | None, seed: int, kernel: Path,
                run_dir: Path) -> None:
    """One live run of the engine on the kernel tables into ``run_dir`` (its small files only)."""
    cmd = command(e, model, gpu, device, threads, seed, kernel.resolve(), run_dir.resolve())
    print("calibrate: engine run: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=e["timeout_s"], check=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "engine_run.log").write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CalibrationError(f"the engine run (python -m simcolo.replay) failed with exit {proc.returncode}: "
                          f"{' | '.join(tail)}; full log in {run_dir / 'engine_run.log'} (engine_run.enabled=false "
                          "writes the kernel tables only)")
    for bulky in ("gpus.parquet", "plots"):      # keep the small files only (refine reads requests.parquet)
        p = run_dir / bulky
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
