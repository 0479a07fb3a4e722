"""Every policy and layout replays live on the CPU with the tiny model, on the same plan as its simulation:
simulate, replay, ``python -m simcolo.compare`` (whose last line is ``max_rel_err=``)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from conftest import run_replay, run_sim
from simcolo.compare import main as compare_main

FULL = ["training.stages=1", "training.micro_batch=2", "training.seq_len=64", "training.global_batch=2",
        "training.activation_checkpointing=false", "training.data.backlog=4"]
LORA = ["training.micro_batch=2", "training.seq_len=64", "training.global_batch=2", "training.data.backlog=4",
        "policy.prefill_instances=1", "policy.decode_instances=1", "policy.max_micro_batch=2"]

#: name -> overrides on top of the tiny model on two CPU "GPUs"
CASES = {
    "least_outstanding": [],
    "round_robin": ["policy=round_robin"],
    "isolated": ["policy=isolated", "policy.serving_gpus=1", *FULL],
    "mix_rr": ["policy=mix_rr", *FULL],
    "mix_luf": ["policy=mix_luf", *FULL],
    "mix_random": ["policy=mix_random", *FULL],
    "lemix": ["policy=lemix", *FULL],
    # a node of two "GPUs" serves with tp=2 tables: the CPU calibration has tp=1 only, so roofline tables
    "lemix_2_stages": ["policy=lemix", *FULL, "training.stages=2", "ROOFLINE"],
    "harli": ["policy=harli", *LORA],
    "static_share": ["policy=static_share", *LORA],
    # FlexLLM-style slices stretch every decode iteration to ~0.9 x the TPOT SLO: short outputs keep it quick
    "flexllm": ["policy=flexllm", *LORA, "workload.lengths.kind=fixed", "workload.lengths.prompt_tokens=64",
                "workload.lengths.output_tokens=8"],
    "tidal": ["policy=tidal", *FULL],
    "tidal_lora": ["policy=tidal_lora", *LORA],
    "distserve": ["serving=distserve", "serving.prefill_instances=1", "serving.decode_instances=1"],
    "sarathi": ["serving=sarathi", "serving.max_batched_tokens=128", "serving.max_num_seqs=32"],
    "lemix_poisson_share": ["policy=lemix", *FULL, "training.data.kind=poisson", "training.data.share=0.5"],
    "mix_rr_requests": ["policy=mix_rr", *FULL, "training.data.kind=requests"],
    "harli_jobs": ["policy=harli", *LORA, "training.data.kind=jobs", "training.data.job_rate_per_s=2",
                   "training.data.job_tasks=3"],
}


@pytest.fixture(scope="module")
def roofline_root(tmp_path_factory):
    """Roofline tables of the tiny model on the CPU at tp 1 and 2 (``python -m simcolo.costs.roofline``)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("roofline")
    for tp in (1, 2):
        subprocess.run([sys.executable, "-m", "simcolo.costs.roofline", "--gpu", "cpu", "--model", "tiny", "--tp",
                        str(tp), "--out", str(root / f"cpu__tiny__tp{tp}")], check=True, capture_output=True)
    return root


def _args(case: str, calibration, roofline) -> list[str]:
    overrides = CASES[case]
    if "ROOFLINE" in overrides:
        costs = ["costs.path=null", f"costs.tables_root={roofline}"]
        overrides = [o for o in overrides if o != "ROOFLINE"]
    else:
        costs = [f"costs.path={calibration[0]}"]
    return ["model=tiny", "gpu=cpu", "cluster=cpu2", *costs, "workload=poisson", "workload.num_requests=24",
            "workload.rate_rps=24", "workload.overlength=clip", "metrics.plots=false", *overrides]


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_replays_live_and_compares_with_its_simulation(case, cpu_calibration, roofline_root, tmp_path,
                                                              capsys):
    args = _args(case, cpu_calibration, roofline_root)
    sim = run_sim(*args, out_dir=tmp_path / "sim")
    live = run_replay(*args, out_dir=tmp_path / "live")
    s, r = sim.summary, live.summary
    assert r["backend"] == "replay" and r["replay_failed"] == ""
    assert r["num_finished"] == r["num_requests"] == s["num_requests"] == 24
    # the same plan: the same instances, KV budget and layout
    for key in ("num_instances", "kv_blocks_per_instance", "layout", "training_kind", "policy"):
        assert r[key] == s[key], key
    if s["training_kind"] != "none":
        assert r["train_tasks_created"] > 0
        trained = r.get("finetune_microbatches", 0) if s["layout"] == "finetune" else r["train_tasks_done"]
        assert trained > 0, "the replay trained nothing"
        steps = pd.read_parquet(tmp_path / "live" / "training.parquet")
        assert len(steps) == r["optimizer_steps"]
    capsys.readouterr()
    assert compare_main([str(tmp_path / "sim"), str(tmp_path / "live")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_rel_err=") and math.isfinite(float(last.split("=")[1]))
    assert json.loads((tmp_path / "live" / "summary.json").read_text())["num_finished"] == 24
