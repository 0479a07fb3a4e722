"""``python -m calibrate.gpu_run OUT``: the whole GPU check in one command, for a GPU lent for minutes.

On one H200 (or H100) it, in about 10 minutes:

1. calibrates Llama-3-8B (``python -m calibrate model=llama3-8b device=cuda profile=gpu_short``: the grid of
   ``grids.gpu_short`` in ``conf/calibrate.yaml``, sized to the fidelity setting, then the engine run);
2. reports the tables' held-out fit error (``python -m calibrate.report``);
3. runs the fidelity runner live against the simulation on those tables for least_outstanding, isolated,
   lemix and harli (``python -m simcolo.replay.fidelity --setting gpu_llama3_8b --device cuda --tables
   ...``; ``conf/fidelity/gpu_llama3_8b.yaml``: a 4x time-scaled slice of the Azure conversation trace);
4. refines the tables from those replays (``python -m calibrate.refine``: the held-out error before and
   after);

and writes the small results into OUT: ``calibration/`` (tables, metadata, the engine run's iteration
log, the report's figures), ``fidelity/`` (the published report: ``fidelity.md`` with the 5 % verdicts,
summaries, comparisons), ``refined/`` (``refine.json``), ``environment.json`` (GPU, driver, torch) and
``gpu_run.log`` (every command and its output). The replays' own directories (parquet files) stay in
``--work`` (default: a temporary directory), outside OUT.

``--dry-run`` does the same on the CPU with the tiny model, small grids and a 1.5-second slice: what the
tests run, so that the script cannot rot.

The GPU machine may lack packages the project needs (simpy, hydra-core, omegaconf, antlr4): carry them as
wheels and name the folder with ``--wheels DIR``; they are installed (``pip install --no-index --no-deps
--target``) into a private directory before anything else runs. To fill DIR on a machine with network
(Python 3.12 on x86-64 Linux)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d DIR simpy==4.1.2 hydra-core==1.3.2 omegaconf==2.3.0
    pip wheel --no-deps -w DIR antlr4-python3-runtime==4.9.3      # published as a source archive only

This module imports only the standard library at the top: it runs before those packages exist.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPU_POLICIES = ("least_outstanding", "isolated", "lemix", "harli")
#: the dry run's calibration: the smallest grids the tables take, one engine run of 3 s of arrivals (made
#: once, steady or not: the dry run checks the plumbing, not this machine's speed)
DRY_CALIBRATION = [
    "repeats=2", "warmup=1", "cpu_min_block_s=0.002", "recheck_tolerance=null",
    "measure=[prefill,decode,train_stage,lora_step,interference]",
    "grids.cpu.prefill.batch_tokens=[16,128,512]", "grids.cpu.prefill.num_seqs=[1,2]",
    "grids.cpu.decode.batch_size=[1,4]", "grids.cpu.decode.kv_tokens_per_seq=[8,128,512]",
    "grids.cpu.train_stage.num_stages=[1]", "grids.cpu.train_stage.micro_batch=[1,2]",
    "grids.cpu.train_stage.seq_len=[64,128]", "grids.cpu.lora_step.rank=[8]",
    "grids.cpu.lora_step.micro_batch=[1,2]", "grids.cpu.lora_step.seq_len=[64,128]",
    "grids.cpu.interference.prefill=[[128,1]]", "grids.cpu.interference.decode=[[1,128]]",
    "grids.cpu.interference.train=[[2,128]]", "grids.cpu.interference.lora=[[1,128]]",
    "grids.cpu.interference.sm_shares=[0.5]", "grids.cpu.interference.duration_s=0.01",
    "engine_run.duration_s=3", "engine_run.tries=1",
]
#: the GPU's: an unsteady engine run is made once more at most (GPU time is short)
GPU_CALIBRATION = ["profile=gpu_short", "repeats=5", "warmup=2", "engine_run.tries=2"]


class Step:
    """Runs the commands, logs them and their output to ``log``, stops the script on a failure."""

    def __init__(self, log: Path, env: dict, cwd: Path):
        self.log, self.env, self.cwd = log, env, cwd

    def __call__(self, *args: str, timeout: float | None = None) -> None:
        cmd = [sys.executable, *map(str, args)]
        t0 = time.perf_counter()
        print("$ " + " ".join(cmd[1:]), flush=True)
        with self.log.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                  timeout=timeout, check=False)
            f.write(f"# exit {proc.returncode} after {time.perf_counter() - t0:.1f} s\n")
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if proc.returncode != 0:
            sys.exit(f"gpu_run: {' '.join(args[:2])} failed (exit {proc.returncode}); see {self.log}")


def install_wheels(wheels: Path, site: Path) -> None:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        sys.exit(f"gpu_run: --wheels {wheels}: no .whl files there")
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"gpu_run: installing the wheels from {wheels} failed: {proc.stderr.strip()[-500:]}")
    print(f"gpu_run: installed {len(found)} wheels from {wheels} into {site}", flush=True)


def missing_modules(env: dict) -> list[str]:
    probe = ("import importlib.util as u; print(','.join(m for m in ('simpy', 'hydra', 'omegaconf', 'antlr4', "
             "'yaml', 'pandas', 'pyarrow', 'matplotlib', 'torch') if u.find_spec(m) is None))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def gpu_spec_name(device_name: str) -> str | None:
    """The conf/gpu spec of a CUDA device name (calibrate's own rule)."""
    from calibrate.harness import GPU_NAMES

    return next((spec for part, spec in GPU_NAMES if part in device_name), None)


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        env["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        smi = shutil.which("nvidia-smi")
        if smi:
            env["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return env


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m calibrate.gpu_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the output folder (new or empty): tables and reports, small files only")
    ap.add_argument("--dry-run", action="store_true", help="the CPU with the tiny model (what the tests run)")
    ap.add_argument("--wheels", default=None, metavar="DIR", help="install the .whl files in DIR first (offline)")
    ap.add_argument("--work", default=None, metavar="DIR",
                    help="where the replays' directories go (default: a temporary directory, removed at the end)")
    ap.add_argument("--policies", default=",".join(GPU_POLICIES), help=f"default {','.join(GPU_POLICIES)}")
    ap.add_argument("--repeats", type=int, default=1, help="replays per policy (default 1)")
    ap.add_argument("--gpu", default=None, help="the conf/gpu spec (default: detected from the device name)")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    t0 = time.perf_counter()
    out = Path(a.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"gpu_run: {out} exists and is not empty; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    if a.wheels is not None:
        site = Path(tempfile.gettempdir()) / "simcolo-gpu-run-site"
        install_wheels(Path(a.wheels).expanduser().resolve(), site)
        sys.path.insert(0, str(site))
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    if (repo / "simcolo").is_dir() and (repo / "conf").is_dir():   # a checkout: its packages, from anywhere
        env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    missing = missing_modules(env)
    if missing:
        sys.exit(f"gpu_run: python modules missing: {', '.join(missing)}; carry their wheels and pass --wheels DIR "
                 "(see python -m calibrate.gpu_run --help)")
    info = environment()
    if a.dry_run:
        device, model, setting, gpu, profile_over = "cpu", "tiny", "cpu_tiny", "cpu", DRY_CALIBRATION
        slice_over = ["workload.end_s=3"]          # 1.5 s of the CPU setting's trace (played at 2x)
        fidelity_over = ["--no-in-situ"]
    else:
        if "device_name" not in info:
            sys.exit("gpu_run: torch sees no CUDA device; --dry-run runs the CPU version")
        gpu = a.gpu or gpu_spec_name(info["device_name"])
        if gpu is None:
            sys.exit(f"gpu_run: no conf/gpu spec for {info['device_name']!r}; name one with --gpu")
        device, model, setting, profile_over, slice_over = "cuda", "llama3-8b", "gpu_llama3_8b", GPU_CALIBRATION, []
        fidelity_over = []
    info.update({"gpu_spec": gpu, "device": device, "model": model, "setting": setting, "argv": sys.argv[1:]})
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    work = Path(a.work).expanduser().resolve() if a.work else Path(tempfile.mkdtemp(prefix="simcolo-gpu-run-"))
    log = out / "gpu_run.log"
    step = Step(log, env, work if work.is_dir() else out)
    work.mkdir(parents=True, exist_ok=True)
    cal = out / "calibration"
    try:
        step("-m", "calibrate", f"model={model}", f"device={device}", f"gpu={gpu}", f"out={cal}",
             "progress_bar=false", *profile_over)
        step("-m", "calibrate.report", cal)
        policies = a.policies
        step("-m", "simcolo.replay.fidelity", "--setting", setting, "--device", device, "--policies", policies,
             "--repeats", str(a.repeats), *fidelity_over, "--tables", cal, "--out", work / "fidelity", "--publish", out / "fidelity",
             f"gpu={gpu}", *slice_over)
        replays = sorted(str(d) for d in (work / "fidelity").glob("*/replay_*") if (d / "iterations.parquet").exists())
        step("-m", "calibrate.refine", *replays, "--tables", cal, "--out", work / "refined")
        (out / "refined").mkdir()
        shutil.copy(work / "refined" / "refine.json", out / "refined" / "refine.json")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_run: done in {time.perf_counter() - t0:.0f} s; results in {out} (report: {out / 'fidelity' / 'fidelity.md'})")


if __name__ == "__main__":
    main()
