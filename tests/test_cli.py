"""The `simcolo` command end to end (a real subprocess, the real shipped trace and tables)."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from simcolo.paths import PROJECT_ROOT


def simcolo(*args, cwd=PROJECT_ROOT):
    return subprocess.run([sys.executable, "-m", "simcolo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_main_job_on_the_azure_conv_trace(tmp_path):
    """The README's main command: all 19,366 requests of the shipped conv trace on 4 Llama-3-8B/H100."""
    proc = simcolo(f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "SLO attainment" in proc.stdout
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["num_requests"] == s["num_finished"] == 19366
    # plausible for an 8B model on H100 at ~1.4 req/s per replica: tens of ms to first token, a few ms
    # per token (roofline: ~7 ms at batch 1), the hour of trace served in about an hour
    assert 0.005 < s["ttft_p50_s"] < 0.5 and s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    assert 0.004 < s["tpot_p50_s"] < 0.05
    assert 3400 < s["duration_s"] < 3700
    assert s["request_throughput_rps"] == pytest.approx(19366 / s["duration_s"])
    assert 0.9 < s["slo_attainment"] <= 1.0
    assert s["goodput_rps"] == pytest.approx(s["slo_attainment"] * s["num_requests"] / s["duration_s"])
    assert s["workload_num_clipped"] == 1   # one conv prompt (14,050 tokens) exceeds Llama-3's 8,192
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 19366 and df["instance"].nunique() == 4
    gpus = pd.read_parquet(tmp_path / "gpus.parquet")
    assert set(gpus["gpu"]) == {0, 1, 2, 3} and (gpus["memory_used_bytes"] <= gpus["memory_capacity_bytes"]).all()
    for name in ("latency_cdf", "throughput", "queue_length", "gpu_timeline"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 5000


def test_same_config_and_seed_give_byte_identical_results(tmp_path):
    args = ["workload=gamma", "workload.num_requests=3000", "workload.rate_rps=12", "seed=7",
            "metrics.plots=false"]
    runs = []
    for name in ("a", "b"):
        assert simcolo(*args, f"hydra.run.dir={tmp_path / name}").returncode == 0
        runs.append((tmp_path / name / "requests.parquet").read_bytes())
    assert runs[0] == runs[1]
    assert (tmp_path / "a" / "summary.json").read_bytes() == (tmp_path / "b" / "summary.json").read_bytes()
    assert (tmp_path / "a" / "gpus.parquet").read_bytes() == (tmp_path / "b" / "gpus.parquet").read_bytes()
    other = tmp_path / "c"
    assert simcolo(*args[:-2], "seed=8", "metrics.plots=false", f"hydra.run.dir={other}").returncode == 0
    assert (other / "requests.parquet").read_bytes() != runs[0]


@pytest.mark.parametrize("args, message", [
    (["workload=trace", "workload.path=MISSING.csv"], "MISSING.csv"),
    (["model=llama3-70b"], "does not fit gpu 'h100-sxm' with serving.tp=1"),
    (["costs.path=/nonexistent/tables"], "/nonexistent/tables"),
    (["costs.path=simcolo/costs/tables/h100-sxm__llama2-7b__tp1"], "model=llama2-7b"),
    (["serving.chunked_prefill=false", "serving.max_batched_tokens=2048"], "serving.max_batched_tokens=2048"),
])
def test_bad_input_stops_with_one_clear_message(tmp_path, args, message):
    proc = simcolo(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.startswith("simcolo: error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "requests.parquet").exists()


def test_malformed_trace_row_names_file_and_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n0.5,12.5,5\n")
    proc = simcolo("workload=trace", f"workload.path={trace}", "workload.format=csv",
                   f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "t.csv" in proc.stderr and "line 3" in proc.stderr and "prompt_tokens" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unknown_config_key_is_refused(tmp_path):
    proc = simcolo("serving.max_num_seq=4", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "max_num_seq" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_multirun_sweep_with_the_joblib_launcher(tmp_path):
    proc = simcolo("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "workload.max_requests=300",
                   "workload.rate_scale=0.5,2", "metrics.plots=false", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["num_requests"] for s in summaries] == [300, 300]
    # twice the rate: the same 300 requests arrive in a quarter of the time of the half-rate run
    assert summaries[1]["duration_s"] < summaries[0]["duration_s"] / 2
