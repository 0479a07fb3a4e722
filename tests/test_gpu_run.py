"""``python -m calibrate.gpu_run``: the one-command GPU check, end to end in its CPU dry run (the tiny
model, small grids, a 1.5-second slice of the CPU fidelity setting), so that it cannot rot while no GPU is
lent. The test replays two of the four policies (serving alone, and harli's two-GPU layout on the CPU):
the others' live paths are the replay tests' (tests/test_replay_policies.py); the script's steps are the same."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from simcolo.paths import PROJECT_ROOT

POLICIES = ("least_outstanding", "harli")


def _gpu_run(*args, cwd=PROJECT_ROOT, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibrate.gpu_run", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_dry_run_calibrates_reports_replays_and_refines(tmp_path):
    out = tmp_path / "out"
    proc = _gpu_run(out, "--dry-run", "--policies", ",".join(POLICIES), cwd=tmp_path)   # from anywhere
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    env = json.loads((out / "environment.json").read_text())
    assert (env["device"], env["model"], env["setting"], env["gpu_spec"]) == ("cpu", "tiny", "cpu_tiny", "cpu")
    meta = json.loads((out / "calibration" / "metadata.json").read_text())
    assert meta["model"] == "tiny" and meta["refined"]["laws"]["decode"]["scale"] > 0
    assert (out / "calibration" / "report_prefill.png").exists()
    report = (out / "fidelity" / "fidelity.md").read_text()
    assert "Target 15%" in report and "one calibration made beforehand" in report
    table = pd.read_csv(out / "fidelity" / "fidelity.csv")
    assert set(table.policy) == set(POLICIES)
    for p in POLICIES:
        summary = json.loads((out / "fidelity" / p / "replay_1_summary.json").read_text())
        assert summary["backend"] == "replay" and summary["replay_failed"] == "" and summary["num_finished"] > 0
        assert json.loads((out / "fidelity" / p / "calibration_metadata.json").read_text())["model"] == "tiny"
    refined = json.loads((out / "refined" / "refine.json").read_text())
    assert len(refined["runs"]) == len(POLICIES) and "decode" in refined["held_out"]
    log = (out / "gpu_run.log").read_text()
    for command in ("-m calibrate model=tiny", "-m calibrate.report", "-m simcolo.replay.fidelity", "-m calibrate.refine"):
        assert command in log
    # small files only: no parquet, nothing of the replays' own directories
    assert not list(out.rglob("*.parquet")) or all(p.parent.name == "engine_run" for p in out.rglob("*.parquet"))
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 5 * 2**20


def test_it_refuses_a_used_folder_and_a_wheel_folder_without_wheels(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    proc = _gpu_run(tmp_path / "used", "--dry-run", timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"gpu_run: {tmp_path / 'used'} exists and is not empty; name a new folder"
    (tmp_path / "wheels").mkdir()
    proc = _gpu_run(tmp_path / "new", "--dry-run", "--wheels", tmp_path / "wheels", timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"gpu_run: --wheels {tmp_path / 'wheels'}: no .whl files there"
