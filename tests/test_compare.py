"""``python -m simcolo.compare``: simulated vs measured run directories, on real simulated runs."""
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import run_sim
from simcolo.compare import CompareError, compare_runs, main, max_rel_err, rel_err
from simcolo.errors import SimcoloError

# the rows, in order, as the command promises them (written out here, not taken from the module)
METRICS = ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s",
           "tpot_p90_s", "tpot_p99_s", "slo_attainment", "request_throughput_rps", "train_tokens_per_s",
           "train_step_time_s", "inference_loss_mean")
SUMMARY_ROWS = [m for m in METRICS if m != "train_step_time_s"]
MAX_ROWS = ("ttft_mean_s", "tpot_mean_s", "train_tokens_per_s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs, each in its own directory: serving only at two loads, LeMix at two loads, isolated."""
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "serve1": ("workload.max_requests=300",),
        "serve2": ("workload.max_requests=300", "workload.rate_scale=2"),
        "lemix1": ("policy=lemix", "cluster=h100x8", "workload.max_requests=300"),
        "lemix2": ("policy=lemix", "cluster=h100x8", "workload.max_requests=300", "workload.rate_scale=2"),
        "isolated": ("policy=isolated", "cluster=h100x8", "workload.max_requests=300"),
    }
    for name, overrides in specs.items():
        run_sim(*overrides, out_dir=root / name)
    return {name: root / name for name in specs}


def _summary(d):
    return json.loads((d / "summary.json").read_text())


def _copy(src, dst):
    shutil.copytree(src, dst)
    for name in ("compare.csv", "compare_cdf.png"):
        (dst / name).unlink(missing_ok=True)
    return dst


def _last_line(out: str) -> str:
    return out.rstrip("\n").splitlines()[-1]


@pytest.mark.parametrize("name", ["serve1", "lemix1"])
def test_run_compared_with_itself_has_zero_error(runs, name, capsys):
    d = runs[name]
    assert main([str(d), str(d)]) == 0
    out = capsys.readouterr().out
    assert _last_line(out) == "max_rel_err=0"
    df = compare_runs(d, d)
    assert list(df.columns) == ["metric", "simulated", "measured", "rel_err"]
    assert (df["rel_err"] == 0).all()
    assert (df["simulated"] == df["measured"]).all()
    assert max_rel_err(df) == 0.0
    # defaults: both written into the second ("measured") run directory
    assert (d / "compare_cdf.png").stat().st_size > 0
    csv = pd.read_csv(d / "compare.csv")
    assert list(csv["metric"]) == list(df["metric"])
    assert not [p for p in d.iterdir() if p.name.startswith(".compare")]  # no temporary files left


@pytest.mark.parametrize("sim,meas", [("serve1", "serve2"), ("lemix1", "lemix2")])
def test_relative_errors_follow_the_summaries(runs, sim, meas, tmp_path, capsys):
    s, m = _summary(runs[sim]), _summary(runs[meas])
    csv, png = tmp_path / "out" / "table.csv", tmp_path / "out" / "cdf.png"
    assert main([str(runs[sim]), str(runs[meas]), "--csv", str(csv), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    df = compare_runs(runs[sim], runs[meas])
    expected_rows = [k for k in SUMMARY_ROWS if k in s or k in m]
    assert [r for r in df["metric"] if r != "train_step_time_s"] == expected_rows
    by_metric = df.set_index("metric")
    for key in expected_rows:
        sv, mv = float(s[key]), float(m[key])
        assert by_metric.loc[key, "simulated"] == sv
        assert by_metric.loc[key, "measured"] == mv
        expected = (0.0 if sv == 0 else math.inf) if mv == 0 else abs(sv - mv) / abs(mv)
        assert by_metric.loc[key, "rel_err"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert (df["rel_err"] > 0).any()  # the loads differ, so do the runs
    expected_max = max(abs(s[k] - m[k]) / abs(m[k]) for k in MAX_ROWS if k in s and k in m)
    assert max_rel_err(df) == pytest.approx(expected_max, rel=1e-12)
    assert _last_line(out) == f"max_rel_err={expected_max:.6g}"
    # the CSV holds the same table, and the figure exists; nothing written to the default places
    table = pd.read_csv(csv)
    assert list(table.columns) == ["metric", "simulated", "measured", "rel_err"]
    assert list(table["metric"]) == list(df["metric"])
    np.testing.assert_allclose(table[["simulated", "measured", "rel_err"]].to_numpy(float),
                               df[["simulated", "measured", "rel_err"]].to_numpy(float), rtol=1e-15)
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (runs[meas] / "compare.csv").exists() and not (runs[meas] / "compare_cdf.png").exists()


def test_training_rows_only_where_a_run_trains(runs):
    serving = compare_runs(runs["serve1"], runs["serve2"])
    assert "train_tokens_per_s" not in set(serving["metric"])
    assert "inference_loss_mean" not in set(serving["metric"])
    assert "train_step_time_s" not in set(serving["metric"])
    lemix = compare_runs(runs["lemix1"], runs["lemix2"])
    assert {"train_tokens_per_s", "inference_loss_mean"} <= set(lemix["metric"])
    # co-located pipelines record no step start (their steps overlap): no step-time row
    assert "train_step_time_s" not in set(lemix["metric"])
    assert list(lemix["metric"]) == [m for m in METRICS if m in set(lemix["metric"])]  # fixed order

    # training in one run only: the row is there, '-' on the other side, and out of the max
    mixed = compare_runs(runs["lemix1"], runs["serve1"]).set_index("metric")
    assert mixed.loc["train_tokens_per_s", "simulated"] == _summary(runs["lemix1"])["train_tokens_per_s"]
    assert math.isnan(mixed.loc["train_tokens_per_s", "measured"])
    assert math.isnan(mixed.loc["train_tokens_per_s", "rel_err"])
    s, m = _summary(runs["lemix1"]), _summary(runs["serve1"])
    expected = max(abs(s[k] - m[k]) / abs(m[k]) for k in ("ttft_mean_s", "tpot_mean_s"))
    assert max_rel_err(mixed.reset_index()) == pytest.approx(expected, rel=1e-12)


def test_training_throughput_counts_in_the_max(runs, tmp_path, capsys):
    sim = runs["lemix1"]
    meas = _copy(sim, tmp_path / "meas")
    m = _summary(meas)
    m["train_tokens_per_s"] *= 0.8  # the only difference: training throughput
    (meas / "summary.json").write_text(json.dumps(m))
    expected = abs(_summary(sim)["train_tokens_per_s"] - m["train_tokens_per_s"]) / m["train_tokens_per_s"]
    assert main([str(sim), str(meas)]) == 0
    assert _last_line(capsys.readouterr().out) == f"max_rel_err={expected:.6g}"
    assert max_rel_err(compare_runs(sim, meas)) == pytest.approx(0.25, rel=1e-12)


def test_step_time_from_training_parquet(runs, capsys):
    d = runs["isolated"]
    steps = pd.read_parquet(d / "training.parquet")
    ok = np.isfinite(steps["start_s"].to_numpy(float))
    assert ok.any()
    expected = float((steps["end_s"][ok] - steps["start_s"][ok]).mean())
    df = compare_runs(runs["lemix1"], d).set_index("metric")
    assert df.loc["train_step_time_s", "measured"] == pytest.approx(expected, rel=1e-12)
    assert math.isnan(df.loc["train_step_time_s", "simulated"])  # LeMix has no finite step starts
    assert list(df.index).index("train_step_time_s") == list(df.index).index("train_tokens_per_s") + 1


def test_missing_values_and_zero_measurements(runs, tmp_path, capsys):
    """A null or NaN metric is '-' and out of the max; a zero measurement gives 0 or inf."""
    sim = _copy(runs["serve1"], tmp_path / "sim")
    meas = _copy(runs["serve1"], tmp_path / "meas")
    s = _summary(sim)
    m = _summary(meas)
    m["tpot_mean_s"] = None
    m["ttft_p50_s"] = float("nan")
    m["slo_attainment"] = 0.0
    s["slo_attainment"] = 0.0
    m["request_throughput_rps"] = 0.0
    (meas / "summary.json").write_text(json.dumps(m))
    (sim / "summary.json").write_text(json.dumps(s))
    df = compare_runs(sim, meas).set_index("metric")
    assert math.isnan(df.loc["tpot_mean_s", "rel_err"]) and math.isnan(df.loc["ttft_p50_s", "rel_err"])
    assert df.loc["slo_attainment", "rel_err"] == 0.0
    assert df.loc["request_throughput_rps", "rel_err"] == math.inf
    assert max_rel_err(df.reset_index()) == 0.0  # ttft_mean_s only: tpot_mean_s is missing
    assert main([str(sim), str(meas)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tpot_mean_s"))
    assert row.split()[2:] == ["-", "-"]
    assert _last_line(out) == "max_rel_err=0"

    m["ttft_mean_s"] = 0.0  # a zero measurement against a non-zero simulation: infinite error
    (meas / "summary.json").write_text(json.dumps(m))
    assert main([str(sim), str(meas)]) == 0
    assert _last_line(capsys.readouterr().out) == "max_rel_err=inf"


def test_rel_err_rules():
    assert rel_err(1.0, 2.0) == 0.5
    assert rel_err(-3.0, -2.0) == 0.5
    assert rel_err(0.0, 0.0) == 0.0
    assert rel_err(1e-9, 0.0) == math.inf
    assert math.isnan(rel_err(math.nan, 1.0)) and math.isnan(rel_err(1.0, math.nan))
    df = pd.DataFrame({"metric": ["ttft_mean_s", "ttft_p99_s", "tpot_mean_s"], "simulated": [1.0, 9.0, 1.0],
                       "measured": [2.0, 1.0, math.nan], "rel_err": [0.5, 8.0, math.nan]})
    assert max_rel_err(df) == 0.5  # ttft_p99_s is not one of the rows the max is over
    assert math.isnan(max_rel_err(df.iloc[1:]))


def _bad(args, capsys):
    assert main([str(a) for a in args]) == 2
    captured = capsys.readouterr()
    assert "max_rel_err" not in captured.out
    return captured.err


def test_bad_input_exits_2_naming_the_path(runs, tmp_path, capsys):
    good = runs["serve1"]
    missing = tmp_path / "no_such_run"
    err = _bad([good, missing], capsys)
    assert err.startswith("simcolo.compare: error: ") and f"{missing}: expected" in err
    err = _bad([missing, good], capsys)
    assert f"{missing}: expected" in err

    no_summary = _copy(good, tmp_path / "no_summary")
    (no_summary / "summary.json").unlink()
    err = _bad([good, no_summary], capsys)
    assert f"{no_summary / 'summary.json'}: expected" in err

    no_requests = _copy(good, tmp_path / "no_requests")
    (no_requests / "requests.parquet").unlink()
    err = _bad([no_requests, good], capsys)
    assert f"{no_requests / 'requests.parquet'}: expected" in err

    bad_json = _copy(good, tmp_path / "bad_json")
    (bad_json / "summary.json").write_text('{"ttft_mean_s": 0.1,')
    err = _bad([good, bad_json], capsys)
    assert f"{bad_json / 'summary.json'}: expected" in err and "JSON" in err

    not_object = _copy(good, tmp_path / "not_object")
    (not_object / "summary.json").write_text("[1, 2]")
    assert f"{not_object / 'summary.json'}: expected" in _bad([good, not_object], capsys)

    bad_parquet = _copy(good, tmp_path / "bad_parquet")
    (bad_parquet / "requests.parquet").write_text("not parquet")
    assert f"{bad_parquet / 'requests.parquet'}: expected" in _bad([good, bad_parquet], capsys)

    with pytest.raises(CompareError) as info:
        compare_runs(good, missing)
    assert isinstance(info.value, SimcoloError) and str(missing) in str(info.value)
    assert not (missing).exists()  # nothing written for a failed comparison
    assert _bad([good], capsys).startswith("usage:")  # argparse's own exit status 2
