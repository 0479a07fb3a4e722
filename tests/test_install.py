"""simcolo installed from its wheel, away from the checkout, and the rules for where it reads and writes.

The slow test builds the sdist and, from it, the wheel (as ``python -m build`` does), installs the wheel
into a fresh venv (its dependencies seen from this environment, the checkout not on its path) and, from
a directory that is not the checkout, runs the README's main job (shortened), a fidelity run on a user's
own config directory (a model, a workload on a trace of the user's, a fidelity setting; it calibrates,
simulates, replays and compares through the installed commands), ``--add`` and ``--publish``, and
``simcolo`` on a calibration named by a relative path. The fast tests pin the path rule
(:func:`simcolo.paths.resolve_path`), ``load_config(config_dir=...)`` and the fidelity runner's checks of
where it writes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_sim

from simcolo.config.compose import load_config
from simcolo.errors import ConfigError
from simcolo.paths import (
    CONF_DIR,
    PROJECT_ROOT,
    TABLES_DIR,
    TRACES_DIR,
    resolve_path,
    shipped_path,
)

#: not part of a source tree: left out of the copy the wheel is built from
_NOT_SOURCE = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
               ".hypothesis", ".ruff_cache", "outputs", "multirun")


# ----------------------------------------------------------------------------- the path rule

def test_relative_paths_resolve_from_the_working_directory_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "traces" / "AzureLLMInferenceTrace_conv.csv"
    mine.parent.mkdir()
    mine.write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n")
    assert resolve_path("traces/AzureLLMInferenceTrace_conv.csv") == mine     # the user's file wins
    (tmp_path / "my.csv").write_text("x")
    assert resolve_path("my.csv") == tmp_path / "my.csv"
    assert resolve_path(str(tmp_path / "my.csv")) == tmp_path / "my.csv"      # absolute: as is


def test_shipped_paths_resolve_inside_the_installation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                                # not the checkout
    assert resolve_path("traces/AzureLLMInferenceTrace_code.csv") == TRACES_DIR / "AzureLLMInferenceTrace_code.csv"
    assert resolve_path("conf/model/tiny.yaml") == CONF_DIR / "model" / "tiny.yaml"
    table = "simcolo/costs/tables/h100-sxm__llama3-8b__tp1"
    assert resolve_path(table) == TABLES_DIR / "h100-sxm__llama3-8b__tp1"
    assert shipped_path("tracesX/a.csv") is None and shipped_path("my/traces/a.csv") is None


def test_a_missing_relative_path_is_reported_where_the_user_stands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("traces/nope.csv") == tmp_path / "traces" / "nope.csv"   # not a shipped file
    assert resolve_path("runs/cal") == tmp_path / "runs" / "cal"
    assert resolve_path("~/x.csv") == Path.home() / "x.csv"


def test_a_trace_the_user_names_relatively_runs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"arrival_s": [0.0, 0.5, 1.0], "prompt_tokens": [10, 20, 30],
                  "output_tokens": [5, 5, 5]}).to_csv(tmp_path / "mine.csv", index=False)
    result = run_sim("workload=trace", "workload.path=mine.csv", "workload.format=csv")
    assert result.summary["num_requests"] == 3 and result.summary["workload_source"] == "csv trace mine.csv"


# ----------------------------------------------------------------------------- a config dir of the user's

def _user_conf(root: Path) -> Path:
    """A config directory of a user's: a model, a workload on a trace of theirs (relative path), and a
    fidelity setting that picks both."""
    conf = root / "myconf"
    (conf / "model").mkdir(parents=True)
    (conf / "workload").mkdir()
    (conf / "fidelity").mkdir()
    tiny = (CONF_DIR / "model" / "tiny.yaml").read_text()
    (conf / "model" / "mymodel.yaml").write_text(tiny.replace("name: tiny", "name: mymodel"))
    (conf / "workload" / "mytrace.yaml").write_text(
        "kind: trace\nrate_scale: 1.0\nstart_s: null\nend_s: null\nmax_requests: null\noverlength: reject\n"
        "path: my_trace.csv\nformat: csv\nchunksize: 65536\n")
    (conf / "fidelity" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: mymodel\n  - override /gpu: cpu\n"
        "  - override /workload: mytrace\ncosts:\n  interference: none\nmetrics:\n  timeline_interval_s: 0.5\n")
    rows = [(round(0.05 * i, 3), 16 + (7 * i) % 48, 4 + (3 * i) % 12) for i in range(40)]   # 40 requests, 2 s
    pd.DataFrame(rows, columns=["arrival_s", "prompt_tokens", "output_tokens"]).to_csv(root / "my_trace.csv",
                                                                                       index=False)
    return conf


def test_load_config_takes_a_users_config_dir_as_the_cli_does(tmp_path):
    conf = _user_conf(tmp_path)
    cfg = load_config(["model=mymodel", "workload=mytrace"], config_dir=conf)
    assert cfg.model.name == "mymodel" and cfg.workload.path == "my_trace.csv"
    assert load_config(["+fidelity=mine"], config_dir=conf).model.name == "mymodel"
    assert load_config(["+fidelity=mine"], config_name="replay", config_dir=conf).gpu.name == "cpu"
    # searched after the shipped configs (Hydra 1.3's --config-dir): a same-named file does not replace one
    (conf / "model" / "tiny.yaml").write_text("name: not-tiny\n")
    assert load_config(["model=tiny"], config_dir=conf).model.name == "tiny"
    with pytest.raises(ConfigError, match="not found"):
        load_config([], config_dir=tmp_path / "nope")


# ----------------------------------------------------------------------------- where fidelity writes

def _fidelity_error(capsys, *argv: str) -> str:
    from simcolo.replay.fidelity import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_fidelity_writes_a_new_run_directory_by_default(tmp_path, monkeypatch):
    from datetime import datetime

    from simcolo.replay.fidelity import default_out_dir

    monkeypatch.chdir(tmp_path)
    when = datetime(2025, 1, 2, 3, 4, 5)
    first = default_out_dir("cpu_tiny", when)
    assert first == tmp_path / "outputs" / "fidelity" / "cpu_tiny" / "2025-01-02_03-04-05"
    first.mkdir(parents=True)
    assert default_out_dir("cpu_tiny", when) == first.with_name("2025-01-02_03-04-05_2")   # never reused


def test_fidelity_refuses_to_overwrite_a_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "fidelity" / "cpu-tiny"             # a published report, as the project commits it
    (committed / "lemix").mkdir(parents=True)
    (committed / "fidelity.md").write_text("report")
    (committed / "lemix" / "sim_summary.json").write_text("{}")
    before = sorted(p.relative_to(committed) for p in committed.rglob("*"))

    assert "exists and is not empty" in _fidelity_error(capsys, "--out", str(committed))
    assert "not a fidelity run's directory" in _fidelity_error(capsys, "--add", "--out", str(committed))
    assert "--add needs --out" in _fidelity_error(capsys, "--add")
    assert "--work is now --out" in _fidelity_error(capsys, "--work", "x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "fidelity_run.json").write_text(json.dumps({"setting": "cpu_tiny", "device": "cpu", "commands": []}))
    assert "a run of --setting cpu_tiny" in _fidelity_error(capsys, "--add", "--out", str(run), "--setting", "other")
    for publish in (run, run / "sub", tmp_path):               # into, under or above the run's directory
        assert "--publish" in _fidelity_error(capsys, "--add", "--out", str(run), "--publish", str(publish))
    assert sorted(p.relative_to(committed) for p in committed.rglob("*")) == before
    assert not (tmp_path / "outputs").exists()                  # refused before anything was written


# ----------------------------------------------------------------------------- the installed wheel

def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1", MPLBACKEND="Agg")
    return env


def _run(cmd: list, cwd: Path, timeout: float = 300, returncode: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == returncode, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    """sdist from a copy of the source tree, then the wheel from the sdist (no network, no isolation)."""
    src = tmp / "src"
    shutil.copytree(PROJECT_ROOT, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    dist = tmp / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"], src)
    (sdist,) = dist.glob("simcolo-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "conf/config.yaml", "conf/hydra/callbacks/compare.yaml",
            "traces/AzureLLMInferenceTrace_conv.csv", "traces/SOURCES.md"} <= names
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, sdist], tmp)
    (wheel,) = dist.glob("simcolo-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp: Path) -> tuple[Path, Path, Path]:
    """A fresh venv with the wheel installed; it sees this environment's packages (torch, simpy, hydra, ...)
    but not the checkout. Returns (python, scripts dir, site-packages)."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv], tmp)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    # this environment's pip installs into the venv (no pip of its own needed)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel], tmp)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip())
    if sys.prefix != sys.base_prefix:
        # this environment is itself a venv (--system-site-packages reaches only the base interpreter's):
        # its site-packages go on the path as plain entries, added after the install so that pip saw none of
        # them; their own .pth files (the checkout's editable finder among them) are not run
        outer = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
        (site / "_simcolo_test_deps.pth").write_text("".join(f"{p}\n" for p in outer))
    return python, bindir, site


def _small_calibration() -> list[str]:
    """Calibrate overrides: the smallest grids the format takes (two values an axis), one sample a point."""
    grids = {"prefill.batch_tokens": "[16,64]", "prefill.num_seqs": "[1,2]", "decode.batch_size": "[1,4]",
             "decode.kv_tokens_per_seq": "[8,64]", "train_stage.num_stages": "[1]",
             "train_stage.micro_batch": "[1,2]", "train_stage.seq_len": "[16,32]"}
    over = ["repeats=1", "warmup=0", "cpu_min_block_s=0.001", "measure=[prefill,decode]", "engine_run.enabled=false",
            *(f"grids.cpu.{k}={v}" for k, v in grids.items())]
    return [f"--calibrate-override={o}" for o in over]


@pytest.mark.slow
def test_the_installed_wheel_runs_from_any_directory(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    shipped = {f"simcolo/{p.relative_to(PROJECT_ROOT).as_posix()}" for p in (PROJECT_ROOT / "conf").rglob("*.yaml")
               if not any(part.startswith(".") for part in p.relative_to(PROJECT_ROOT).parts)}
    assert shipped <= names and "simcolo/conf/config.yaml" in names           # every config
    assert {"simcolo/traces/AzureLLMInferenceTrace_conv.csv", "simcolo/traces/AzureLLMInferenceTrace_code.csv",
            "simcolo/traces/SOURCES.md", "simcolo/costs/tables/h100-sxm__llama3-8b__tp1/decode.csv"} <= names
    assert not [n for n in names if n.startswith(("conf/", "traces/", "tests/"))]

    python, bindir, site = _venv_with(wheel, tmp_path)
    work = tmp_path / "work"                                   # where the user stands: not the checkout
    work.mkdir()
    probe = ("import json, sys, simcolo, simcolo.paths as p; print(json.dumps({'file': simcolo.__file__, "
             "'conf': str(p.CONF_DIR), 'traces': str(p.TRACES_DIR), 'tables': str(p.TABLES_DIR), 'path': sys.path}))")
    where = json.loads(_run([python, "-c", probe], work).stdout)
    assert Path(where["file"]) == site / "simcolo" / "__init__.py"          # the installed package is imported
    assert (Path(where["conf"]), Path(where["traces"]), Path(where["tables"])) == (
        site / "simcolo" / "conf", site / "simcolo" / "traces", site / "simcolo" / "costs" / "tables")
    checkout = PROJECT_ROOT.resolve()
    assert not [p for p in where["path"] if p and Path(p).resolve().is_relative_to(checkout)
                and not Path(p).resolve().is_relative_to(Path(sys.prefix).resolve())], where["path"]

    # the README's main job, shortened: shipped configs (the sweep preset, the comparison callback), the
    # shipped trace and the shipped tables, read from the installed package
    proc = _run([bindir / "simcolo", "-m", "+sweep=compare", "workload.max_requests=50", "metrics.plots=false",
                 "hydra.sweep.dir=sweep"], work)
    assert "comparison of 4 runs" in proc.stdout
    for k, policy in enumerate(("isolated", "lemix", "harli", "tidal")):
        summary = json.loads((work / "sweep" / str(k) / "summary.json").read_text())
        assert (summary["num_requests"], summary["num_finished"], summary["policy"]) == (50, 50, policy)
        assert summary["workload_source"] == "azure trace traces/AzureLLMInferenceTrace_conv.csv"
        assert summary["cost_source"] == "roofline" and summary["train_tokens_per_s"] > 0
        assert len(pd.read_parquet(work / "sweep" / str(k) / "requests.parquet")) == 50
    assert set(pd.read_csv(work / "sweep" / "comparison.csv").policy) == {"isolated", "lemix", "harli", "tidal"}

    # a fidelity run on the user's own configs (--config-dir: a model, a workload on the user's trace, the
    # setting). A first try fails (a bad calibrate override) and leaves its new run directory, as a killed
    # run would; --add then measures the policy into that run and publishes the report.
    conf = _user_conf(work)
    fidelity = [python, "-m", "simcolo.replay.fidelity", "--config-dir", "myconf", "--setting", "mine",
                "--policies", "round_robin", "--repeats", "1", *_small_calibration()]
    proc = _run([*fidelity, "--calibrate-override=repeats=0"], work, returncode=1)
    (run,) = (work / "outputs" / "fidelity" / "mine").iterdir()              # a new directory under the cwd
    assert f"fidelity: writing to {run}" in proc.stdout and "command failed" in proc.stderr
    assert {"fidelity_run.json", "fidelity.log"} <= {p.name for p in run.iterdir()}
    published = work / "published"                 # an earlier publish: a policy this report will not have,
    (published / "harli").mkdir(parents=True)      # a replay it will not have, and a folder of the user's
    (published / "harli" / "sim_summary.json").write_text("{}")
    (published / "round_robin").mkdir()
    (published / "round_robin" / "compare_3.csv").write_text("old")
    (published / "notes").mkdir()
    _run([*fidelity, "--add", "--out", run, "--publish", "published"], work)
    assert json.loads((run / "round_robin" / "calibration" / "metadata.json").read_text())["model"] == "mymodel"
    sim = json.loads((run / "round_robin" / "sim" / "summary.json").read_text())
    live = json.loads((run / "round_robin" / "replay_1" / "summary.json").read_text())
    assert sim["workload_source"] == live["workload_source"] == "csv trace my_trace.csv"
    assert (sim["num_requests"], live["num_requests"], live["num_finished"]) == (40, 40, 40)
    assert live["backend"] == "replay" and sim["cost_source"] == "measured"
    assert "| round_robin | ttft_mean_s |" in (run / "fidelity.md").read_text()
    assert set(pd.read_csv(run / "fidelity.csv").policy) == {"round_robin"}
    assert [c["argv"][-1] for c in json.loads((run / "fidelity_run.json").read_text())["commands"]] == [
        "--calibrate-override=repeats=0", "published"]
    assert {p.name for p in published.iterdir()} == {"fidelity.csv", "fidelity_runs.csv", "fidelity.md",
                                                     "drift.json", "load.json", "round_robin", "notes"}
    assert {p.name for p in (published / "round_robin").iterdir()} == {
        "sim_summary.json", "calibration_metadata.json", "compare_1.csv", "replay_1_summary.json"}
    assert (published / "fidelity.md").read_text() == (run / "fidelity.md").read_text()
    assert {p.name for p in work.iterdir()} == {"myconf", "my_trace.csv", "outputs", "published", "sweep"}

    # simcolo on that calibration named relative to where the user stands, with the user's model and trace
    cal = (run / "round_robin" / "calibration").relative_to(work)
    _run([bindir / "simcolo", "--config-dir", conf.name, "model=mymodel", "gpu=cpu", "cluster=single",
          "workload=mytrace", f"costs.path={cal}", "costs.interference=none", "metrics.plots=false",
          "hydra.run.dir=mine"], work)
    summary = json.loads((work / "mine" / "summary.json").read_text())
    assert summary["num_requests"] == 40 and summary["cost_source"] == "measured"
