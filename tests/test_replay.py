"""The live replay on the CPU with the tiny model: real threads, real kernels, real trace slices,
against a calibration made on this machine in the same session. Timings are not asserted (they are
the fidelity report's business); what a replay must do is: serve every request with the policy's
decisions, train and serve the trained versions, write the simulator's outputs, and fail loudly while
keeping its records."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_replay, run_sim
from simcolo.errors import ConfigError
from simcolo.paths import PROJECT_ROOT

TRAIN = ["training.stages=1", "training.micro_batch=2", "training.seq_len=64", "training.global_batch=2",
         "training.activation_checkpointing=false", "training.data.backlog=8"]


def common(calibration, n: int = 40, rate: float = 20.0) -> list[str]:
    out, _, _ = calibration
    # the tiny model's 512-token context: conv-trace lengths are clipped to it, not refused
    return ["model=tiny", "gpu=cpu", f"costs.path={out}", "workload=poisson", f"workload.num_requests={n}",
            f"workload.rate_rps={rate}", "workload.overlength=clip"]


def _requests(out_dir) -> pd.DataFrame:
    return pd.read_parquet(out_dir / "requests.parquet").sort_values("request_id").reset_index(drop=True)


def test_serving_replay_serves_the_trace_as_the_simulator_schedules_it(cpu_calibration, tmp_path):
    args = [*common(cpu_calibration), "cluster=single"]
    sim = run_sim(*args, out_dir=tmp_path / "sim")
    rep = run_replay(*args, out_dir=tmp_path / "replay", plots=True)
    s = rep.summary
    assert s["backend"] == "replay" and s["replay_failed"] == "" and s["num_finished"] == 40
    a, b = _requests(tmp_path / "sim"), _requests(tmp_path / "replay")
    # the same requests, with the same lengths, all served, one token per iteration
    assert (a[["request_id", "arrival_s", "prompt_tokens", "output_tokens"]] ==
            b[["request_id", "arrival_s", "prompt_tokens", "output_tokens"]]).all().all()
    assert (b.status == "finished").all()
    assert (b.first_token_s >= b.arrival_s).all() and (b.finish_s >= b.first_token_s).all()
    multi = b.output_tokens > 1
    assert (b.tpot_s[multi] > 0).all()
    # the wall clock: the replay ends after the last arrival, requests are served in real time
    assert s["replay_end_s"] >= b.arrival_s.max()
    assert s["iterations"] >= b.output_tokens.max()
    for f in ("requests.parquet", "gpus.parquet", "summary.json", "plots/latency_cdf.png"):
        assert (tmp_path / "replay" / f).exists(), f
    gpus = pd.read_parquet(tmp_path / "replay" / "gpus.parquet")
    assert list(gpus.columns) == list(pd.read_parquet(tmp_path / "sim" / "gpus.parquet").columns)
    assert (gpus.busy_s.diff().dropna() >= 0).all() and gpus.busy_s.iloc[-1] > 0
    assert sim.summary["num_finished"] == 40


def test_lemix_replay_trains_the_model_it_serves(cpu_calibration, tmp_path):
    rep = run_replay(*common(cpu_calibration, n=30), "cluster=single", "policy=lemix", *TRAIN,
                     "costs.interference=none", out_dir=tmp_path)
    s = rep.summary
    assert s["num_finished"] == 30 and s["layout"] == "pipelines"
    train = pd.read_parquet(tmp_path / "training.parquet")
    assert s["optimizer_steps"] == len(train) > 0
    assert list(train.version) == list(range(1, len(train) + 1))        # one version per step
    assert s["train_tasks_done"] >= 2 * len(train)                       # global_batch tasks per step
    assert train.start_s.isna().all() and (train.end_s.diff().dropna() > 0).all()
    req = _requests(tmp_path)
    # a request is served by the version its node had when it was scheduled: never ahead of training
    steps_before = np.searchsorted(train.end_s.to_numpy(), req.first_token_s.to_numpy(), side="right")
    assert (req.model_version <= steps_before).all() and req.model_version.max() > 0
    # the served (trained) model was really updated in place: it differs from a fresh build
    from simcolo.engine.model import build_model

    served = rep.backend.serving_models[0]
    fresh = build_model(rep.backend.model, seed=0)
    assert not torch.equal(served.lm_head.weight.detach(), fresh.lm_head.weight)


def test_isolated_replay_trains_in_its_own_process_and_syncs_weights(cpu_calibration, tmp_path):
    rep = run_replay(*common(cpu_calibration, n=30), "cluster=cpu2", "policy=isolated", "policy.serving_gpus=1",
                     "policy.sync_every=2", *TRAIN, out_dir=tmp_path)
    s = rep.summary
    assert s["num_finished"] == 30 and s["layout"] == "isolated"
    train = pd.read_parquet(tmp_path / "training.parquet")
    assert len(train) == s["optimizer_steps"] > 0 and (train.end_s > train.start_s).all()
    assert (train.tasks == 2).all() and (train.tokens == 2 * 2 * 64).all()
    assert s["weight_syncs"] >= 1 and s["weight_syncs"] <= len(train) // 2
    req = _requests(tmp_path)
    assert (req.model_version % 2 == 0).all()          # serving sees synced versions only
    # the serving replica's weights are the trainer's after a sync: not the initial ones
    from simcolo.engine.model import build_model

    served = rep.backend.serving_models[0]
    fresh = build_model(rep.backend.model, seed=0)
    assert not torch.equal(served.lm_head.weight.detach(), fresh.lm_head.weight)


def test_a_kernel_failure_stops_the_replay_and_keeps_every_record(cpu_calibration, tmp_path, monkeypatch):
    from simcolo.engine.runner import ServingRunner
    from simcolo.replay.run import ReplayFailed

    calls = {"n": 0}
    decode = ServingRunner.decode

    def failing_decode(self, keys, ids):  # fault injection: the 60th decode runs out of memory
        calls["n"] += 1
        if calls["n"] == 60:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return decode(self, keys, ids)

    monkeypatch.setattr(ServingRunner, "decode", failing_decode)
    with pytest.raises(ReplayFailed, match=r"serving instance 0 on cpu: OutOfMemoryError: CUDA out of memory"):
        run_replay(*common(cpu_calibration, n=40), "cluster=single", out_dir=tmp_path)
    req = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(req) == 40 and req.request_id.is_unique                      # nothing dropped
    statuses = set(req.status)
    assert "replay_failed" in statuses and statuses <= {"finished", "replay_failed", "not_replayed"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "OutOfMemoryError" in summary["replay_failed"]
    assert summary["num_requests"] == 40


@pytest.mark.parametrize("overrides, match", [
    (["policy=lemix", "training.stages=1"], r"activation_checkpointing=true is not run live"),
    (["policy=isolated", "cluster=h100x4", "training.stages=1", "training.activation_checkpointing=false"],
     r"policy.serving_gpus=4, training.stages=1 with 4 GPUs: the live replay trains one isolated replica.*=3\)"),
    (["policy=isolated", "cluster=h100x4", "policy.serving_gpus=2", "training.stages=2",
      "training.activation_checkpointing=false"], r"trains one isolated replica on one GPU"),
    (["serving.tp=2", "cluster=cpu2"], r"serving.tp=2: tensor parallelism is not run live"),
    (["device=tpu"], r"device='tpu'; expected cpu or cuda"),
    (["policy=isolated", "cluster=cpu2", "policy.serving_gpus=1", *TRAIN, "training.data.backlog=1"],
     r"training.data.backlog=1 is smaller than one isolated step"),
    (["replay.isolated_trainer=fork", "policy=isolated", "cluster=cpu2", "policy.serving_gpus=1", *TRAIN],
     r"replay.isolated_trainer='fork'"),
])
def test_unsupported_or_bad_settings_are_named(cpu_calibration, overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run_replay(*common(cpu_calibration, n=5), "cluster=single", *overrides, out_dir=tmp_path)


def test_kv_cache_that_cannot_fit_is_refused_before_anything_runs(cpu_calibration, tmp_path):
    with pytest.raises(ConfigError, match=r"serving.max_num_seqs=256 x model.max_context_len=512 .* KV budget"):
        run_replay(*common(cpu_calibration, n=5), "cluster=single", "serving.num_gpu_blocks_override=64",
                   out_dir=tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_cuda_without_a_gpu_is_a_clear_error(cpu_calibration, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"device=cuda but torch .* sees no CUDA device"):
        run_replay(*common(cpu_calibration, n=5), "cluster=single", "device=cuda", out_dir=tmp_path)


def test_replay_and_compare_commands(cpu_calibration, tmp_path):
    """What a user types: simulate, replay, compare; the comparison's last line is max_rel_err=."""
    args = [*common(cpu_calibration, n=30), "cluster=single", "metrics.plots=false"]
    py = sys.executable
    for mod, d in (("simcolo", "sim"), ("simcolo.replay", "replay")):
        proc = subprocess.run([py, "-m", mod, *args, f"hydra.run.dir={tmp_path / d}"], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replayed on cpu" in proc.stdout
    proc = subprocess.run([py, "-m", "simcolo.compare", str(tmp_path / "sim"), str(tmp_path / "replay")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_rel_err=") and float(last.split("=")[1]) >= 0
    table = pd.read_csv(tmp_path / "replay" / "compare.csv")
    assert {"ttft_mean_s", "tpot_mean_s", "request_throughput_rps"} <= set(table.metric)


def test_every_iteration_is_logged_with_the_tables_prediction_for_that_batch(cpu_calibration, tmp_path):
    from simcolo.costs import cost_model_for

    rep = run_replay(*common(cpu_calibration, n=20), "cluster=single", out_dir=tmp_path)
    it = pd.read_parquet(tmp_path / "iterations.parquet")
    assert len(it) == rep.summary["iterations"]
    assert (it.end_s > it.start_s).all() and (it.start_s.diff().dropna() > 0).all()
    cost = cost_model_for("cpu", "tiny", 1, cpu_calibration[0])
    pre, dec = it[it.prefill_seqs > 0], it[it.prefill_seqs == 0]
    assert pre.prefill_tokens.sum() == pd.read_parquet(tmp_path / "requests.parquet").prompt_tokens.sum()
    assert np.allclose(pre.predicted_s, [cost.prefill_s(t, n) for t, n in zip(pre.prefill_tokens, pre.prefill_seqs)])
    assert np.allclose(dec.predicted_s, [cost.decode_s(b, kv) for b, kv in zip(dec.decode_seqs, dec.kv_tokens)])
    s = rep.summary
    measured = (dec.end_s - dec.start_s).sum()
    assert s["replay_decode_time_over_table"] == pytest.approx(measured / dec.predicted_s.sum())


def test_fidelity_tables_rescale_and_drift(cpu_calibration, tmp_path):
    """The fidelity runner's two table operations, on the session's real calibration."""
    from simcolo.replay.fidelity import calibration_drift, rescale_tables

    src = cpu_calibration[0] / "kernel"         # the sweep's tables (drift compares against them)
    rescale_tables(src, tmp_path / "x", {"replay_prefill_time_over_table": 1.5,
                                         "replay_decode_time_over_table": float("nan"),
                                         "replay_train_time_over_table": 1.25})
    # the training ratio scales both training tables (a run's simulation reads its own job's)
    for table, factor in (("prefill", 1.5), ("decode", 1.0), ("train_stage", 1.25), ("lora_step", 1.25)):
        a, b = pd.read_csv(src / f"{table}.csv"), pd.read_csv(tmp_path / "x" / f"{table}.csv")
        assert np.allclose(b.latency_s, factor * a.latency_s)
        assert a.drop(columns="latency_s").equals(b.drop(columns="latency_s"))
    drift = calibration_drift(src.parent, tmp_path / "x")
    assert drift["prefill"] == pytest.approx(0.5) and drift["decode"] == pytest.approx(0.0)
    from simcolo.costs import CostModel

    assert CostModel.load(tmp_path / "x").prefill_s(256, 1) == pytest.approx(1.5 * CostModel.load(src).prefill_s(256, 1))


def test_fidelity_runner_plans_every_policy_on_its_setting(cpu_calibration):
    """``python -m simcolo.replay.fidelity --policies all``: every policy's simulation and replay config
    loads, passes the live checks and plans on the CPU setting (the runs themselves are the fidelity job)."""
    from simcolo.config.run import RunConfig
    from simcolo.config.compose import load_config
    from simcolo.hardware.cluster import Topology
    from simcolo.layout.plan import plan_layout
    from simcolo.policies import POLICIES, make_policy
    from simcolo.replay.backend import check_live
    from simcolo.replay.fidelity import policy_overrides

    kinds = set()
    for name in sorted(POLICIES):
        cfg = load_config(["+fidelity=cpu_tiny", *policy_overrides(name), f"costs.path={cpu_calibration[0]}"],
                          config_name="replay")
        run = RunConfig.from_cfg(cfg)
        policy = make_policy(run.policy)
        check_live(run, policy)
        plan = plan_layout(run, policy, Topology.from_config(run.gpu, run.cluster))
        kinds.add(plan.kind)
        assert (plan.trainer is None) == (policy.layout == "serving"), name
    assert kinds == {"serving", "isolated", "pipelines", "finetune"}


def test_isolated_and_harli_are_calibrated_in_their_own_layout_on_the_cpu(cpu_calibration):
    """The fidelity runner's calibration of isolated and harli runs its engine fit in the policy's own
    two-"GPU" layout (on the profile's synthetic workload and training settings); the others, and any
    policy on a GPU, keep the profile's one-device run. Each such engine run's config loads, passes the live
    checks and plans the policy's layout."""
    from omegaconf import OmegaConf

    from simcolo.config.compose import load_config
    from simcolo.config.run import RunConfig
    from simcolo.hardware.cluster import Topology
    from simcolo.layout.plan import plan_layout
    from simcolo.paths import CONF_DIR
    from simcolo.policies import make_policy
    from simcolo.replay.backend import check_live
    from simcolo.replay.fidelity import engine_layout, policy_overrides

    for other in ("lemix", "least_outstanding", "static_share", "flexllm"):
        assert engine_layout(other, "cpu") == []
    assert engine_layout("harli", "cuda") == []
    profile = OmegaConf.load(CONF_DIR / "calibrate.yaml").engine_run.profiles.cpu
    for name in ("isolated", "harli"):
        (override,) = engine_layout(name, "cpu")
        key, value = override.split("=", 1)
        layout = json.loads(value)
        assert key == "engine_run.profiles.cpu.layout" and layout[:len(policy_overrides(name))] == policy_overrides(name)
        assert "training.data.kind=poisson" in layout and not any(o.startswith(("training=", "cluster=single"))
                                                                     for o in layout)
        cfg = load_config(["model=tiny", "gpu=cpu", *profile.workload, *layout, f"costs.path={cpu_calibration[0]}"],
                          config_name="replay")
        run = RunConfig.from_cfg(cfg)
        policy = make_policy(run.policy)
        check_live(run, policy)
        plan = plan_layout(run, policy, Topology.from_config(run.gpu, run.cluster))
        assert plan.kind == ("isolated" if name == "isolated" else "finetune") and run.cluster.num_gpus == 2
        assert run.training.kind == ("full" if name == "isolated" else "lora")


# LoRA finetuning live on a small KV pool: 256 blocks of 16 tokens, a finetune micro-batch of two 64-token
# sequences borrows 200 of them, and four decoding 400-token requests need up to 100
HARLI = ["cluster=cpu2", "costs.interference=none", "workload.lengths.kind=fixed",
         "workload.lengths.prompt_tokens=200", "workload.lengths.output_tokens=200", "training.micro_batch=2",
         "training.seq_len=64", "training.global_batch=2", "training.data.backlog=8", "policy.prefill_instances=1",
         "policy.decode_instances=1", "policy.max_micro_batch=2", "serving.max_num_seqs=4",
         "serving.num_gpu_blocks_override=256"]


def test_harli_live_decode_never_waits_for_blocks_held_by_finetuning(cpu_calibration, tmp_path):
    harli = run_replay(*common(cpu_calibration, n=24, rate=24), "policy=harli", *HARLI, out_dir=tmp_path / "h")
    s = harli.summary
    assert s["num_finished"] == 24 and s["finetune_microbatches"] > 0 and s["optimizer_steps"] > 0
    # decode takes its blocks back at once whenever it runs short (aborting the micro-batch in flight:
    # how often depends on timing, so only the outcome is asserted)
    assert s["decode_waits_on_finetune_blocks"] == 0
    # the same pressure with the baseline's static carve-out, which is never given back: decode waits
    # (and preempts)
    static = run_replay(*common(cpu_calibration, n=24, rate=24), "policy=static_share", *HARLI,
                        out_dir=tmp_path / "s")
    assert static.summary["decode_waits_on_finetune_blocks"] > 0
    assert static.summary["finetune_aborted_microbatches"] == 0


def test_a_finetune_failure_stops_the_replay_and_keeps_every_record(cpu_calibration, tmp_path, monkeypatch):
    from simcolo.replay.finetuner import LiveFinetuner
    from simcolo.replay.run import ReplayFailed

    calls = {"n": 0}
    compute = LiveFinetuner._compute

    def failing_compute(self, job):  # fault injection: the 5th finetune micro-batch hits a kernel error
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return compute(self, job)

    monkeypatch.setattr(LiveFinetuner, "_compute", failing_compute)
    with pytest.raises(ReplayFailed, match=r"finetun.*RuntimeError: CUDA error: an illegal memory access"):
        run_replay(*common(cpu_calibration, n=24, rate=24), "policy=harli", *HARLI, out_dir=tmp_path)
    req = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(req) == 24 and req.request_id.is_unique                      # nothing dropped
    statuses = set(req.status)
    assert statuses <= {"finished", "replay_failed", "not_replayed"} and statuses - {"finished"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "illegal memory access" in summary["replay_failed"]
    steps = pd.read_parquet(tmp_path / "training.parquet")
    assert len(steps) == summary["optimizer_steps"]                         # the steps before it are kept
