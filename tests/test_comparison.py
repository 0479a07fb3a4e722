"""Policy comparison across a multirun: real sweeps through the real `simcolo -m` CLI, the comparison
callback enabled on the command line (`hydra/callbacks=compare`), and the report checked against each
job's own summary.json."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simcolo.metrics.comparison import (
    DEFAULT_KEYS,
    PLOT_FILES,
    REPORT_FILES,
    IncompleteRunsWarning,
    NoRunsError,
    _cell,
    comparison_table,
    format_metric,
    format_table,
    load_runs,
    main,
    resolve_multirun_dir,
    write_report,
)
from simcolo.metrics.comparison_plots import (
    pareto,
    pareto_front,
    training_progress,
    utilization_frame,
)
from simcolo.paths import PROJECT_ROOT

_SCRIPT = Path(sys.executable).with_name("simcolo")
POLICIES = ("round_robin", "least_outstanding")


def simcolo(*args):
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "simcolo"]
    return subprocess.run([*cmd, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def policy_sweep(tmp_path_factory):
    """Both routing policies on the first 200 requests of the Azure conv trace, callback on."""
    sweep = tmp_path_factory.mktemp("policies")
    proc = simcolo("-m", f"policy={','.join(POLICIES)}", "workload.max_requests=200", "metrics.plots=false",
                   "hydra/callbacks=compare", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    return sweep, proc


def _summaries(sweep: Path) -> list[dict]:
    return [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]


def test_sweep_end_writes_the_report_with_each_jobs_real_values(policy_sweep):
    sweep, proc = policy_sweep
    summaries = _summaries(sweep)
    csv = pd.read_csv(sweep / "comparison.csv")
    assert list(csv["job"]) == [0, 1] and list(csv["policy"]) == list(POLICIES)
    assert list(csv["run_dir"]) == [str(sweep / "0"), str(sweep / "1")]
    assert csv["overrides"][0].split() == ["policy=round_robin", "workload.max_requests=200", "metrics.plots=False"]
    for (_, row), summary in zip(csv.iterrows(), summaries):
        for key, value in summary.items():          # every summary key, at its real value
            if isinstance(value, str):
                assert row[key] == value, key
            elif value is None or (isinstance(value, float) and math.isnan(value)):
                assert pd.isna(row[key]), key
            else:
                assert row[key] == pytest.approx(value, rel=1e-12, abs=0), key
    md = (sweep / "comparison.md").read_text()
    assert "| metric | round_robin | least_outstanding |" in md
    assert f"| slo_attainment | {_cell(summaries[0]['slo_attainment'])} | {_cell(summaries[1]['slo_attainment'])} |" in md
    for name in ("comparison_latency_cdf.png", "comparison_utilization.png"):
        assert (sweep / name).stat().st_size > 5000, name
    # serving only: nothing trains, so no Pareto and no training plot -- and the report says why
    assert not (sweep / "comparison_pareto.png").exists() and not (sweep / "comparison_training.png").exists()
    page = (sweep / "report.html").read_text()
    assert "No run in this sweep trains (training=none everywhere)" in page
    assert page.count("data:image/png;base64,") == 2        # the two comparison plots; runs had plots off
    for summary in summaries:
        assert f">{_cell(summary['ttft_p99_s'])}</td>" in page
    assert not list(sweep.glob(".comparison*")) and not list(sweep.glob(".report*"))   # no temporary files left

    # the table printed at the end of the sweep: both policies, each value of the job's summary
    lines = proc.stdout.split(f"comparison of 2 runs in {sweep}:\n")[1].splitlines()
    header = lines[0]
    assert header.split() == ["metric", *POLICIES]
    for key in ("slo_attainment", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s"):
        row = next(line for line in lines if line.startswith(key + " "))
        assert row.split() == [key, *(_cell(s[key]) for s in summaries)]
    assert f"comparison: {sweep / 'comparison.csv'}" in proc.stdout
    assert f"report: {sweep / 'report.html'} (self-contained: open it in a browser)" in proc.stdout


def test_side_by_side_table_in_process(policy_sweep):
    sweep, _ = policy_sweep
    summaries = _summaries(sweep)
    df = load_runs(sweep)
    assert df.attrs["incomplete"] == [] and list(df["label"]) == list(POLICIES)
    table = comparison_table(df)
    assert list(table.columns) == list(POLICIES)
    assert list(table.index) == [k for k in DEFAULT_KEYS if k in table.index]    # DEFAULT_KEYS order
    for key in DEFAULT_KEYS:   # a row is left out exactly when no run has the key (train_job: none)
        has = any((isinstance(s.get(key), (int, float)) and not math.isnan(s[key]))
                  or (isinstance(s.get(key), str) and s[key] != "none") for s in summaries)
        assert (key in table.index) == has, key
    for policy, s in zip(POLICIES, summaries):
        assert table.loc["slo_attainment", policy] == s["slo_attainment"]
        assert table.loc["ttft_p99_s", policy] == s["ttft_p99_s"]
    text = format_table(table)
    assert len({len(line) for line in text.splitlines()}) == 1     # fixed width
    turned = format_table(table.T, corner="run").splitlines()      # large sweeps print a line per run
    assert turned[0].startswith("run ") and "slo_attainment" in turned[0]
    assert [line.split()[0] for line in turned[1:]] == list(POLICIES)


def test_keys_a_run_lacks_are_nan_and_shown_as_dashes(policy_sweep, tmp_path):
    """As when a co-located run (with training metrics) is compared with a serving-only one."""
    sweep = shutil.copytree(policy_sweep[0], tmp_path / "sweep")
    for job, value in ((0, 1234.5), (1, None)):
        path = sweep / str(job) / "summary.json"
        s = json.loads(path.read_text())
        s.pop("train_tokens_per_s", None)
        if value is not None:
            s["train_tokens_per_s"] = value
        path.write_text(json.dumps(s))
    df = load_runs(sweep)
    assert df["train_tokens_per_s"].iloc[0] == 1234.5 and np.isnan(df["train_tokens_per_s"].iloc[1])
    table = comparison_table(df)
    assert "train_tokens_per_s" in table.index
    row = next(line for line in format_table(table).splitlines() if line.startswith("train_tokens_per_s"))
    assert row.split() == ["train_tokens_per_s", "1,234", "-"]
    with pytest.warns(UserWarning, match="training.parquet is missing"):   # job 0 "trains" without records
        paths = write_report(sweep)
    # a run with training throughput: the Pareto plot is drawn; no training records: no progress plot
    assert [p.name for p in paths] == ["comparison.csv", "comparison.md", "comparison_pareto.png",
                                       "comparison_latency_cdf.png", "comparison_utilization.png", "report.html"]
    assert pd.read_csv(sweep / "comparison.csv")["train_tokens_per_s"].isna().tolist() == [False, True]
    assert "No training records" in (sweep / "report.html").read_text()


def test_a_job_without_summary_is_reported_not_dropped(policy_sweep, tmp_path, capsys):
    sweep = shutil.copytree(policy_sweep[0], tmp_path / "sweep")
    (sweep / "1" / "summary.json").unlink()          # as a job that failed
    with pytest.warns(IncompleteRunsWarning, match=str(sweep / "1")):
        df = load_runs(sweep)
    assert list(df["job"]) == [0] and df.attrs["incomplete"] == [str(sweep / "1")]
    assert main([str(sweep), "--no-plots"]) == 0          # python -m simcolo.metrics.comparison DIR
    out = capsys.readouterr().out
    assert f"comparison of 1 run in {sweep} (1 incomplete jobs left out: {sweep / '1'}):" in out
    assert "round_robin" in out
    assert f"Incomplete jobs (no summary.json, left out): {sweep / '1'}" in (sweep / "comparison.md").read_text()
    page = (sweep / "report.html").read_text()
    assert f"1 job directory without summary.json (failed or still running) left out: {sweep / '1'}" in page
    assert '<section id="run-1">' in page and '<section id="run-2">' not in page
    assert len(pd.read_csv(sweep / "comparison.csv")) == 1
    (sweep / "0" / "summary.json").unlink()
    with pytest.warns(IncompleteRunsWarning), pytest.raises(FileNotFoundError, match="no completed runs"):
        load_runs(sweep)


def test_a_directory_without_jobs_raises_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no job directories in {tmp_path}"):
        load_runs(tmp_path)
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match="summary.json"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs(tmp_path / "missing")
    assert main([str(tmp_path)]) == 2


def test_one_policy_swept_over_rates_is_labelled_by_the_overrides(tmp_path):
    """The callback again, with the joblib launcher (jobs in other processes) and plots off."""
    proc = simcolo("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "workload.rate_scale=0.5,2",
                   "workload.max_requests=200", "metrics.plots=false", "hydra/callbacks=compare",
                   "hydra.callbacks.compare.plots=false", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.split(f"comparison of 2 runs in {tmp_path}:\n")[1].splitlines()[0]
    assert header.split() == ["metric", "rate_scale=0.5", "rate_scale=2"]     # printed as the plots name them
    csv = pd.read_csv(tmp_path / "comparison.csv")
    assert list(csv["label"]) == ["workload.rate_scale=0.5", "workload.rate_scale=2"]
    assert csv["goodput_rps"][1] > 2 * csv["goodput_rps"][0]       # 4x the arrival rate, all attained
    assert not list(tmp_path.glob("*.png"))
    page = (tmp_path / "report.html").read_text()     # the report is written with plots off too, saying so
    assert "Plots were turned off" in page and "data:image/png" not in page
    assert "workload.rate_scale=0.5" in page and "workload.rate_scale=2" in page


def test_utilization_from_busy_time_or_the_utilization_column(policy_sweep):
    gpus = pd.read_parquet(policy_sweep[0] / "0" / "gpus.parquet")
    derived = utilization_frame(gpus.drop(columns="utilization", errors="ignore"))
    assert ((derived >= 0) & (derived <= 1)).all() and derived.index.min() > 0
    # integrated over time, the curve accounts for (almost) all the busy time the GPUs report
    dt = np.diff(np.r_[0.0, derived.index.to_numpy()])
    busy = gpus.groupby("gpu")["busy_s"].max().mean()
    assert 0.9 * busy <= float((derived.to_numpy() * dt).sum()) <= busy + 1e-9
    if "utilization" in gpus.columns:   # the run's own column, where it writes one, says the same
        pd.testing.assert_series_equal(utilization_frame(gpus), derived, rtol=1e-9)
    given = utilization_frame(gpus.assign(utilization=0.25))
    assert (given == 0.25).all() and given.index.equals(derived.index)


def test_pareto_front():
    x = np.array([0.9, 1.0, 0.8, 0.9, 0.7])
    y = np.array([100.0, 0.0, 50.0, 100.0, 200.0])
    assert pareto_front(x, y).tolist() == [4, 0, 3, 1]     # by SLO attainment; ties both kept


def test_counts_are_whole_numbers_in_every_table():
    assert format_metric("optimizer_steps", 2.0) == "2" and format_metric("optimizer_steps", 5480.0) == "5,480"
    assert format_metric("cost_off_grid_queries", 0) == "0" and format_metric("num_preemptions", float("nan")) == "-"
    assert format_metric("slo_attainment", 1.0) == _cell(1.0) == "1.000"
    assert format_metric("train_tokens_per_s", 1234.5) == "1,234"


def test_pareto_and_training_progress_are_skipped_when_nothing_trains(policy_sweep, tmp_path):
    df = load_runs(policy_sweep[0])
    assert pareto(df, tmp_path / "p.png") is None and training_progress(df, tmp_path / "t.png") is None
    assert not list(tmp_path.iterdir())
    # a stale plot from an earlier report would contradict this one: rewriting the report removes it
    sweep = shutil.copytree(policy_sweep[0], tmp_path / "sweep")
    (sweep / "comparison_pareto.png").write_bytes(b"stale")
    names = [p.name for p in write_report(sweep)]
    assert "comparison_pareto.png" not in names and not (sweep / "comparison_pareto.png").exists()
    assert set(names) == set(REPORT_FILES) | {"comparison_latency_cdf.png", "comparison_utilization.png"}
    assert set(PLOT_FILES) >= {"comparison_pareto.png", "comparison_training.png"}


# ---------------------------------------------------------------- SIMCOLO_MULTIRUN_DIR, relative or not
def test_a_relative_multirun_dir_is_found_from_where_the_user_stands(tmp_path, monkeypatch):
    (tmp_path / "here" / "multirun" / "a").mkdir(parents=True)
    (tmp_path / "shell" / "multirun" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv("PWD", str(tmp_path / "shell"))
    # the working directory first (the notebook kernel's), then $PWD (where jupyter was started)
    assert resolve_multirun_dir("multirun/a") == tmp_path / "here" / "multirun" / "a"
    assert resolve_multirun_dir("multirun/b") == tmp_path / "shell" / "multirun" / "b"
    assert resolve_multirun_dir(str(tmp_path / "shell" / "multirun" / "b")) == tmp_path / "shell" / "multirun" / "b"
    # then the project root (where `simcolo -m` run from the checkout writes multirun/)
    assert resolve_multirun_dir("conf/sweep") == PROJECT_ROOT / "conf" / "sweep"
    monkeypatch.setenv("HOME", str(tmp_path / "shell"))
    assert resolve_multirun_dir("~/multirun/b") == tmp_path / "shell" / "multirun" / "b"
    with pytest.raises(NoRunsError, match="tried .*here/multirun/c, .*shell/multirun/c"):
        resolve_multirun_dir("multirun/c")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_multirun_dir(tmp_path / "nowhere")
    assert resolve_multirun_dir("b", bases=[tmp_path / "shell" / "multirun"]) == tmp_path / "shell" / "multirun" / "b"


def test_run_names_of_several_words_are_stacked_over_header_lines():
    table = pd.DataFrame({"lemix rate_scale=2": [0.998, 64853.0], "isolated rate_scale=2": [1.0, 31719.0]},
                         index=pd.Index(["slo_attainment", "train_tokens_per_s"], name="metric"))
    lines = format_table(table).splitlines()
    assert len({len(line) for line in lines}) == 1                    # fixed width
    assert lines[0].split() == ["lemix", "isolated"]
    assert lines[1].split() == ["metric", "rate_scale=2", "rate_scale=2"]
    assert lines[3].split() == ["train_tokens_per_s", "64,853", "31,719"]
    assert len(lines[0]) < len("train_tokens_per_s") + 2 * (len("isolated rate_scale=2") + 2)
