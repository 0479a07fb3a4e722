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
    # one conv request (line 5444: 14,050 + 39 tokens) exceeds Llama-3's 8,192-token context: refused, as vLLM does
    assert s["num_requests"] == 19366 and s["num_finished"] == 19365 and s["status_exceeds_context"] == 1
    assert proc.stderr.splitlines()[-1] == (
        "simcolo: 1 request(s) longer than the model's context (8,192 tokens, prompt + output) refused with status "
        "exceeds_context; workload.overlength=clip shortens them to fit instead")
    # plausible for an 8B model on H100 at ~1.4 req/s per replica: tens of ms to first token, a few ms
    # per token (roofline: ~7 ms at batch 1), the hour of trace served in about an hour
    assert 0.005 < s["ttft_p50_s"] < 0.5 and s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    assert 0.004 < s["tpot_p50_s"] < 0.05
    assert 3400 < s["duration_s"] < 3700
    assert s["request_throughput_rps"] == pytest.approx(19365 / s["duration_s"])
    assert 0.9 < s["slo_attainment"] <= 1.0
    assert s["goodput_rps"] == pytest.approx(s["slo_attainment"] * s["num_requests"] / s["duration_s"])
    assert s["workload_num_clipped"] == 0
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 19366 and df.loc[df.status == "finished", "instance"].nunique() == 4
    refused = df[df.status == "exceeds_context"]
    assert refused[["prompt_tokens", "output_tokens", "instance"]].values.tolist() == [[14050, 39, -1]]
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


def _refused(proc, tmp_path, message: str) -> None:
    """One clear line on stderr, a non-zero exit and no summary: the CLI's answer to a config mistake."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simcolo: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "requests.parquet").exists()


@pytest.mark.parametrize("args, message", [
    (["seed=abc"], "seed must be an integer, got 'abc'"),
    (["seed=1.5"], "seed must be an integer, got 1.5"),
    (["seed=-1"], "seed must be >= 0, got -1"),
    (["+serving.max_num_seq=3"],
     "serving.max_num_seq is not a known key (did you mean serving.max_num_seqs?); known keys of serving: "),
    (["+policy.max_num_seqs=3"],
     "policy.max_num_seqs is not a known key; known keys of policy (least_outstanding): name"),
    (["policy=isolated", "cluster=h100x8", "+policy.sync_evry=3"],
     ("policy.sync_evry is not a known key (did you mean policy.sync_every?); "
      "known keys of policy (isolated): name, serving_gpus, sync_every")),
    (["policy=isolated", "cluster=h100x8", "policy.sync_every=often"],
     "policy.sync_every must be an integer, got 'often'"),
    (["+workload.rate_rps=3"],
     ("workload.rate_rps is not a known key (did you mean workload.rate_scale?); "
      "known keys of workload with workload.kind=trace: ")),
    (["workload=poisson", "+workload.lengths.prompt=8"],
     "workload.lengths.prompt is not a known key (did you mean workload.lengths.prompt_tokens?)"),
    (["workload.overlength=truncate"], "workload.overlength 'truncate' is unknown; expected one of: reject, clip"),
    (["model=llama3-70b", "cluster=single", "serving.tp=2"],
     "serving.tp=2 needs 2 GPUs, but the cluster has 1 GPU (cluster.num_nodes=1 x cluster.gpus_per_node=1)"),
    (["serving=distserve", "cluster=single"],
     ("serving.prefill_instances=1 + serving.decode_instances=3 with serving.tp=1 needs 4 GPUs, "
      "but the cluster has 1 GPU")),
    (["policy=lemix", "cluster=single"],
     ("training.stages=2 (a node of that many GPUs serves with tp=2 and trains 2 pipeline stages) needs 2 GPUs, "
      "but the cluster has 1 GPU")),
    (["policy=harli"],
     ("policy.prefill_instances=2 + policy.decode_instances=6 needs 8 GPUs, "
      "but the cluster has 4 GPUs (cluster.num_nodes=1 x cluster.gpus_per_node=4)")),
])
def test_config_mistakes_stop_with_one_line_naming_the_key(tmp_path, args, message):
    _refused(simcolo(*args, "workload.max_requests=20", f"hydra.run.dir={tmp_path}"), tmp_path, message)


def test_calibrate_refuses_a_bad_seed_before_measuring(tmp_path):
    for seed, message in (("abc", "seed must be an integer, got 'abc'"), ("1.5", "seed must be an integer, got 1.5")):
        proc = subprocess.run([sys.executable, "-m", "calibrate", f"seed={seed}", f"out={tmp_path / 'tables'}"],
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == f"calibrate: error: {message}", proc.stderr
        assert not (tmp_path / "tables").exists()


_TOO_LONG = "simcolo: 2 request(s) longer than the model's context (8,192 tokens, prompt + output)"


@pytest.mark.parametrize("mode, line", [
    ("reject", f"{_TOO_LONG} refused with status exceeds_context; workload.overlength=clip shortens them to fit instead"),
    ("clip", f"{_TOO_LONG} clipped to fit; workload.overlength=reject refuses them instead, as vLLM does"),
])
def test_over_length_requests_are_reported_in_one_console_line(tmp_path, mode, line):
    trace = tmp_path / "long.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,100,10\n0.5,9000,10\n1.0,8000,200\n1.5,50,5\n")
    args = ["workload=trace", f"workload.path={trace}", "workload.format=csv", "metrics.plots=false",
            f"workload.overlength={mode}"]
    proc = simcolo(*args, f"hydra.run.dir={tmp_path / mode}")
    assert proc.returncode == 0, proc.stderr
    assert [x for x in proc.stderr.splitlines() if "context" in x] == [line]
    s = json.loads((tmp_path / mode / "summary.json").read_text())
    assert s["num_finished"] == (2 if mode == "reject" else 4)
    fits = simcolo(*args, "workload.max_requests=1", f"hydra.run.dir={tmp_path / 'fits'}")   # nothing to report
    assert fits.returncode == 0 and "context" not in fits.stderr


@pytest.mark.parametrize("policy, applies, absent", [
    ("least_outstanding", [], ["GPU utilisation", "training (", "bubble rate", "LeMix throughput"]),
    ("lemix", ["GPU utilisation", "training (full, pipelines)", "bubble rate", "LeMix throughput"], []),
    ("harli", ["GPU utilisation", "training (lora, finetune)"], ["bubble rate", "LeMix throughput"]),
])
def test_the_console_shows_the_rows_that_apply_and_cli_log_holds_the_run(tmp_path, policy, applies, absent):
    cluster = "cluster=h100x4" if policy == "least_outstanding" else "cluster=h100x8"
    proc = simcolo(f"policy={policy}", cluster, "workload.max_requests=120", "metrics.plots=false",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    for text in ["serving instances busy", *applies]:
        assert text in proc.stdout, text
    for text in absent:
        assert text not in proc.stdout, text
    assert "nan" not in proc.stdout
    # the run's log holds what the console showed, with times and levels
    log = (tmp_path / "cli.log").read_text()
    assert f"[simcolo][INFO] - outputs: {tmp_path}" in log
    for line in proc.stdout.splitlines():
        assert line in log, line


def test_a_quiet_run_keeps_its_summary_in_cli_log_and_errors_go_there_too(tmp_path):
    quiet = simcolo("workload.max_requests=50", "metrics.plots=false", "metrics.quiet=true",
                    f"hydra.run.dir={tmp_path / 'quiet'}")
    assert quiet.returncode == 0 and "SLO attainment" not in quiet.stdout
    assert "SLO attainment" in (tmp_path / "quiet" / "cli.log").read_text()
    bad = simcolo("seed=-3", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and not (tmp_path / "bad" / "summary.json").exists()
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("simcolo: error: seed")
    assert f"[simcolo.stderr][ERROR] - {line}" in (tmp_path / "bad" / "cli.log").read_text()
