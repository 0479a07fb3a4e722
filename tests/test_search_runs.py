"""The searches end to end: `simcolo -m +search=...` in a real subprocess, the real simulator, the shipped
trace and tables (no mocks)."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_sim

from simcolo.paths import PROJECT_ROOT
from simcolo.search.capacity import trials_needed
from simcolo.search.pareto import dominates


def simcolo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "simcolo", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------------------------ co-location
#: a short slice under load with a 50 ms TPOT SLO: splits that train more break the SLO, so the front
#: has a trade-off; isolated and LeMix only, 8 trials (4 random, then one NSGA-II generation)
SMALL = ["-m", "+search=colocation", "workload.max_requests=600", "workload.rate_scale=12", "slo.tpot_s=0.05",
         "policy=choice(lemix,isolated)", "hydra.sweeper.n_trials=8", "hydra.sweeper.sampler.population_size=4"]


@pytest.mark.slow
def test_colocation_search_returns_a_reproducible_pareto_front(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        proc = simcolo(*SMALL, f"hydra.sweep.dir={d}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = (dirs[0] / "pareto.csv").read_bytes()
    assert a == (dirs[1] / "pareto.csv").read_bytes()            # same seed: same trials, same front
    assert (dirs[0] / "comparison.csv").is_file() and (dirs[0] / "optimization_results.yaml").is_file()
    assert (dirs[0] / "pareto.png").stat().st_size > 20_000

    front = pd.read_csv(dirs[0] / "pareto.csv")
    objectives = ["train_flops_per_s", "slo_attainment"]
    pts = front[objectives].to_numpy()
    assert len({tuple(p) for p in pts}) >= 2                      # a real trade-off, not one point
    assert not any(dominates(p, q) for p in pts for q in pts)     # no point of the front beats another
    assert (np.diff(front["train_flops_per_s"]) <= 0).all()       # best training first
    assert front["meets_slo_target"].tolist() == (front["slo_attainment"] >= 0.99).tolist()

    # every run of the search is on the front or beaten by a run on it (read from the jobs themselves)
    jobs = sorted(p for p in dirs[0].iterdir() if p.name.isdigit())
    assert len(jobs) == 8
    for job in jobs:
        s = json.loads((job / "summary.json").read_text())
        p = (s["train_flops_per_s"], s["slo_attainment"])
        assert int(job.name) in set(front["job"]) or any(dominates(q, p) for q in pts)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        keys = {o.split("=")[0] for o in overrides}
        # the trial's whole config is in its overrides: layout, intensity and knobs
        assert "training.stages" in keys and "training.data.backlog" in keys
        assert s["policy"] in ("lemix", "isolated") and s["train_job"] == "full"
    for _, row in front.iterrows():                               # each front row is its job's summary
        s = json.loads((dirs[0] / str(row["job"]) / "summary.json").read_text())
        assert row["train_flops_per_s"] == pytest.approx(s["train_flops_per_s"], rel=1e-15)
        assert row["overrides"] == " ".join(yaml.safe_load(
            (dirs[0] / str(row["job"]) / ".hydra" / "overrides.yaml").read_text()))
    out = proc.stdout
    assert f"search: {len(front)} of 8 runs on the Pareto front" in out
    assert "most train_flops_per_s with slo_attainment >= 0.99: job" in out


def test_a_policy_with_no_layout_on_the_cluster_stops_the_search_before_any_job(tmp_path):
    proc = simcolo("-m", "+search=colocation", "cluster=single", "policy=choice(lemix,harli)",
                   "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode != 0
    assert "no layout plans on this cluster" in proc.stderr and "lemix" in proc.stderr and "harli" in proc.stderr
    assert not any(p.name.isdigit() for p in tmp_path.iterdir())   # no job was launched


# ---------------------------------------------------------------------------------------- capacity
#: an M/D/c-like queue: Poisson arrivals of identical requests (512-token prompt, 2 output tokens), one
#: request at a time per GPU (serving.max_num_seqs=1), routed to the least-loaded GPU
MDC = ["workload=poisson", "workload.lengths.kind=fixed", "workload.lengths.prompt_tokens=512",
       "workload.lengths.output_tokens=2", "workload.max_requests=null", "workload.num_requests=2000",
       "serving.max_num_seqs=1"]


@pytest.fixture(scope="module")
def service_time_s():
    """D: one request alone on one H100 (its prefill, then one decode step), from the shipped tables."""
    s = run_sim(*MDC[:-2], "workload.num_requests=1", "cluster=single").summary   # (max_num_seqs moot)
    assert s["num_finished"] == 1
    return s["e2el_mean_s"]


def _capacity_table(d):
    return pd.read_csv(d / "capacity.csv")


def test_capacity_of_an_md_c_queue_matches_the_hand_calculation(tmp_path, service_time_s):
    """Hand calculation. Each GPU serves one request at a time for D seconds (deterministic), so n GPUs
    under Poisson arrivals at rate lam form an M/D/n queue of utilisation rho = lam D / n. With
    lam = 2.5 / D:

    * n = 2: rho = 1.25 > 1, the queue grows at lam - 2/D = 0.5/D requests per second and a request's
      wait at time t is about 0.25 t; it exceeds the TTFT SLO of 20 D after t = 80 D, i.e. after the first
      lam * 80 D = 200 of the 2,000 requests: attainment ~ 10 %;
    * n = 3: rho = 0.83; even M/M/3 (exponential service, a worse queue than M/D/3) waits longer than
      t with probability C(3, 2.5) exp(-(3/D - lam) t) = 0.70 exp(-0.5 t / D): 0.70 e^-9.5 ~ 5e-5 at
      t = 19 D (the SLO less the prefill): attainment >= 99.99 %.

    So the fewest GPUs meeting slo_attainment >= 0.99 is ceil(lam D) = 3.
    """
    D = service_time_s
    lam = 2.5 / D
    candidates = 8                                           # 1..8 GPUs on one node
    n_trials = trials_needed(candidates, 2)                  # 2 rounds of 2 parallel probes
    assert n_trials == 4
    proc = simcolo("-m", "+search=capacity", *MDC, f"workload.rate_rps={lam!r}", f"slo.ttft_s={20 * D!r}",
                   "hydra.callbacks.search.max_count=8", f"hydra.sweeper.n_trials={n_trials}",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = _capacity_table(tmp_path)
    assert len(t) == n_trials
    answer = t[t["answer"]]
    assert answer["num_gpus"].tolist() == [3] and answer["cluster.gpus_per_node"].tolist() == [3]
    two = t[t["num_gpus"] == 2]
    assert len(two) == 1 and not two["meets"].iloc[0] and two["slo_attainment"].iloc[0] < 0.2   # ~10 %
    assert t[t["num_gpus"] >= 3]["meets"].all() and not t[t["num_gpus"] < 3]["meets"].any()
    # the run at 3 GPUs: each GPU busy rho = lam D / 3 of the time
    job3 = tmp_path / str(int(answer["job"].iloc[0]))
    s3 = json.loads((job3 / "summary.json").read_text())
    assert s3["gpu_busy_frac_mean"] == pytest.approx(2.5 / 3, rel=0.03)
    assert proc.stdout.strip().splitlines()[-1].startswith(
        "capacity: 3 GPUs (cluster.gpus_per_node=3) meet slo_attainment >= 0.99; 2 GPUs (cluster.gpus_per_node=2) "
        "do not")
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == 3.0                         # Optuna's own result names the count too


def test_capacity_with_a_training_rate_through_the_submitit_launcher(tmp_path, service_time_s):
    """Isolated serving on 4 GPUs (the M/D/c case above needs 3; on one node the 2-stage training replicas
    take GPUs in pairs, so the serving part is even) and full-parameter training replicas of 2 stages on
    the rest: only 6, 8, 10 and 12 GPUs plan. One replica trains at r1 FLOP/s (measured: the run at 6
    GPUs); asking for 1.5 r1 needs 2 replicas: 4 + 2 x 2 = 8 GPUs. Launched through
    hydra-submitit-launcher's local executor: SLURM's launcher, code path and job pickling, on this
    machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed "
                        "(pip install -e '.[slurm]')")
    D = service_time_s
    common = [*MDC, f"workload.rate_rps={2.5 / D!r}", f"slo.ttft_s={20 * D!r}", "policy=isolated",
              "policy.serving_gpus=4", "training.stages=2", "training.micro_batch=1", "training.seq_len=1024",
              "training.global_batch=4", "training.data.backlog=16"]
    r1 = run_sim(*common, "cluster.gpus_per_node=6").summary
    assert r1["slo_attainment"] >= 0.99 and r1["train_flops_per_s"] > 0
    need = 1.5 * r1["train_flops_per_s"]
    proc = simcolo("-m", "+search=capacity", *common, "hydra/launcher=submitit_local",
                   "hydra.callbacks.search.max_count=12", f"hydra.callbacks.search.min_train_flops_per_s={need!r}",
                   f"hydra.sweep.dir={tmp_path}")             # n_trials=0: as many as the bisection needs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "capacity: 4 candidate counts plan (cluster.gpus_per_node = 6, 8, 10, 12); 4 trials, 2 at a time" \
        in proc.stdout
    t = _capacity_table(tmp_path)
    assert len(t) == trials_needed(4, 2) == 4
    assert set(t["num_gpus"]) <= {6, 8, 10, 12}               # only counts that plan
    assert t[t["answer"]]["num_gpus"].tolist() == [8]
    six = t[t["num_gpus"] == 6]
    assert six["slo_attainment"].iloc[0] >= 0.99 and six["train_flops_per_s"].iloc[0] < need
    assert math.isclose(six["train_flops_per_s"].iloc[0], r1["train_flops_per_s"], rel_tol=1e-12)
    assert "capacity: 8 GPUs (cluster.gpus_per_node=8) meet slo_attainment >= 0.99 and train_flops_per_s >=" \
        in proc.stdout
    assert (tmp_path / ".submitit").is_dir()                 # the jobs went through submitit
