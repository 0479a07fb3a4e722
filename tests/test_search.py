"""The searches' parts on their own: the Pareto rule, the bisection sampler, the job-neutral training
work of a run (real runs), the presets composing with every launcher, the search space's layouts."""
import math

import numpy as np
import pytest
from conftest import run_sim

from simcolo.search.capacity import (
    BisectionSampler,
    answer,
    probes,
    trials_needed,
    undecided,
)
from simcolo.search.pareto import dominates, non_dominated
from simcolo.search.space import candidate_layouts, feasible_interval, gene_value


# ----------------------------------------------------------------------------------------- Pareto
def _brute_front(points, directions):
    sign = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    s = np.asarray(points, float) * sign
    keep = []
    for i, p in enumerate(s):
        if np.isnan(p).any():
            keep.append(False)
            continue
        keep.append(not any(dominates(q, p) for j, q in enumerate(s) if j != i and not np.isnan(q).any()))
    return np.array(keep)


@pytest.mark.parametrize("directions", [("maximize", "maximize"), ("maximize", "minimize"),
                                        ("minimize", "maximize", "maximize")])
def test_non_dominated_is_the_set_no_point_beats(directions):
    rng = np.random.default_rng(7)
    pts = rng.integers(0, 6, size=(60, len(directions))).astype(float)   # small integers: many ties
    pts[3] = np.nan
    mask = non_dominated(pts, directions)
    assert (mask == _brute_front(pts, directions)).all()
    assert not mask[3]                       # a run without a number is never on the front
    sign = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    front = pts[mask] * sign
    assert not any(dominates(a, b) for a in front for b in front)     # no point of the front beats another
    for p in pts[~mask & ~np.isnan(pts).any(axis=1)] * sign:            # every other run is beaten by one
        assert any(dominates(f, p) for f in front)


def test_equal_runs_are_both_on_the_front():
    pts = np.array([[1.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    assert non_dominated(pts, ["maximize", "maximize"]).tolist() == [True, True, False]


# ------------------------------------------------------------------------------------- bisection
def test_undecided_and_probes_by_hand():
    # 16 candidates, nothing known: outcomes 0..16 (16 = none meets); the middle splits them 8 / 9
    assert undecided(16, {}) == (0, 16)
    assert probes(16, {}, 1) == [7]
    assert probes(16, {}, 2) == [4, 10]          # 17 outcomes in three parts: 5, 6, 6
    assert undecided(16, {7: True, 3: False, 12: True}) == (4, 7)
    assert probes(16, {7: True, 3: False}, 1) == [5]
    assert probes(16, {4: False, 5: True}, 3) == []     # decided: index 5
    assert [trials_needed(16, k) for k in (1, 2, 3)] == [5, 6, 9]   # k * ceil(log_{k+1} 17): 17 outcomes
    assert trials_needed(8, 2) == 4 and trials_needed(1, 1) == 1


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_bisection_sampler_pins_every_threshold_in_the_trials_it_promises(n, k):
    """Through Optuna's ask/tell, as the sweeper drives it: batches of k trials, each told its value
    (the count if it meets, else +inf); after trials_needed(n, k) trials the answer is pinned."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    choices = list(range(3, 3 + n))
    for t in range(n + 1):                       # the first meeting index (n: none meets)
        study = optuna.create_study(direction="minimize", sampler=BisectionSampler("gpus", batch=k, seed=0))
        for _ in range(trials_needed(n, k) // k):
            trials = [study.ask() for _ in range(k)]
            values = [t_.suggest_categorical("gpus", choices) for t_ in trials]
            for trial, v in zip(trials, values):
                study.tell(trial, float(v) if choices.index(v) >= t else math.inf)
        import pandas as pd

        done = study.trials_dataframe()
        table = pd.DataFrame({"gpus": done["params_gpus"], "meets": np.isfinite(done["value"])})
        best, lower, pinned, broken = answer(table, "gpus", choices)
        assert pinned and not broken, (n, k, t, table)
        assert best == (choices[t] if t < n else None)
        if 0 < t < n:
            assert lower == choices[t - 1]


# ------------------------------------------------------------------------ the job-neutral work unit
def _llama3_8b_params():
    """Llama-3-8B by hand from its published config (conf/model/llama3-8b.yaml)."""
    h, kv, inter, layers, vocab = 4096, 8 * 128, 14336, 32, 128256
    layer = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h       # q, k, v, o; SwiGLU; two RMSNorms
    n = layers * layer + vocab * h                                     # + the output projection
    lora = layers * 16 * ((h + h) + (h + kv) + (h + kv) + (h + h))    # rank 16 on q, k, v, o
    return n, lora


@pytest.mark.parametrize("overrides, job, train_gpus", [
    ((), "none", 0),                                           # serving alone
    (("policy=isolated", "cluster=h100x8"), "full", 4),        # 4 serve, 2 replicas x 2 stages train
    (("policy=lemix", "cluster=h100x8"), "full", 8),           # every GPU serves and trains
    (("policy=harli", "cluster=h100x8"), "lora", 6),           # the 6 decode GPUs finetune
])
def test_train_flops_and_mfu_follow_the_6n_and_lora_rules(overrides, job, train_gpus):
    s = run_sim(*overrides, "workload.max_requests=300").summary
    n, lora = _llama3_8b_params()
    assert n == pytest.approx(7.50e9, rel=0.01)
    assert s["train_job"] == job
    if job == "none":
        assert s["train_flops_per_s"] == 0.0 and s["train_mfu"] == 0.0
        return
    per_token = 6 * n if job == "full" else 4 * n + 6 * lora
    assert s["train_tokens_per_s"] > 0
    assert s["train_flops_per_s"] == pytest.approx(per_token * s["train_tokens_per_s"], rel=1e-12)
    assert s["train_mfu"] == pytest.approx(s["train_flops_per_s"] / (train_gpus * 989.0e12), rel=1e-12)
    assert 0 < s["train_mfu"] < 1


# ---------------------------------------------------------------------------------- the presets
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from simcolo.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
    "search_slurm": ("hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "LocalLauncher"),
    "search_ray": ("hydra_plugins.hydra_ray_launcher", "RayLauncher"),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("search", ["colocation", "capacity"])
def test_search_presets_compose_with_every_launcher(search, launcher):
    module, cls = LAUNCHERS[launcher]
    pytest.importorskip(module, reason=f"{module} is not installed (see README: Searches)")
    cfg = _compose(f"+search={search}", f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_.endswith(cls)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.callbacks.compare and cfg.hydra.callbacks.search
    assert "search" not in cfg                  # nothing of the search reaches the simulator's config
    if search == "colocation":
        assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
        assert cfg.hydra.sweeper.sampler.seed == cfg.seed == 0
        assert list(cfg.hydra.sweeper.direction) == ["maximize", "maximize"]
        assert list(cfg.hydra.callbacks.search.objectives) == ["train_flops_per_s", "slo_attainment"]
    else:
        assert cfg.hydra.sweeper.sampler._target_ == "simcolo.search.capacity.BisectionSampler"
        assert cfg.hydra.sweeper.sampler.param == "cluster.gpus_per_node"
        assert cfg.hydra.sweeper.sampler.batch == cfg.hydra.sweeper.n_jobs
    if launcher == "search_slurm":
        assert cfg.hydra.launcher.cpus_per_task == 1 and cfg.hydra.launcher.timeout_min == 60
    if launcher == "search_ray":
        assert cfg.hydra.launcher.ray.remote.num_cpus == 1
        assert cfg.hydra.launcher.ray.init.object_store_memory is None


def test_the_default_colocation_search_fits_its_trial_budget():
    cfg = _compose("+search=colocation")
    s = cfg.hydra.sweeper
    assert s.n_trials <= 32 and s.sampler.population_size <= s.n_trials
    assert cfg.workload.max_requests == 1500 and cfg.metrics.plots is False
    cap = _compose("+search=capacity")
    assert cap.hydra.sweeper.n_trials == 0        # sized at the start: as many as the bisection needs


# ------------------------------------------------------------------------------ the search space
def test_layouts_of_eight_gpus_from_most_serving_to_most_training():
    iso = candidate_layouts("isolated", 8, [2, 4])
    assert [(d["policy.serving_gpus"], d["training.stages"]) for d in iso] == [(6, 2), (4, 2), (4, 4), (2, 2)]
    assert candidate_layouts("pipelines", 8, [1, 2, 3, 4, 8]) == [{"training.stages": s} for s in (1, 2, 4, 8)]
    fin = candidate_layouts("finetune", 4, [2])
    assert [(d["policy.prefill_instances"], d["policy.decode_instances"]) for d in fin] == [(3, 1), (2, 2), (1, 3)]
    assert candidate_layouts("serving", 4, [2]) == [{}]


def test_genes_and_feasible_intervals():
    assert [gene_value(u, 1, 64, True) for u in (0.0, 0.5, 1.0)] == [1, 8, 64]
    assert [gene_value(u, 16, 64, False) for u in (0.0, 0.5, 1.0, 7.0)] == [16, 40, 64, 64]
    grid = list(range(1, 65))
    assert feasible_interval(grid, lambda v: v >= 32) == (31, 63)       # a backlog: one step's tasks and up
    assert feasible_interval(grid, lambda v: v <= 5) == (0, 4)          # a micro-batch: up to what fits
    assert feasible_interval(grid, lambda v: 10 <= v <= 12) == (9, 11)
    assert feasible_interval(grid, lambda v: False) is None
