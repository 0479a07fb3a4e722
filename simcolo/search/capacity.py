"""How many GPUs does a trace need? The fewest that meet the SLO target (and, optionally, a training rate),
found by bisection over the GPU count.

``simcolo -m +search=capacity`` runs it as a Hydra sweep: Hydra's Optuna sweeper asks
:class:`BisectionSampler` for each trial's GPU count, launches the trials on the configured launcher
(joblib here, Ray or SLURM elsewhere), and tells the study each trial's result, which
:class:`simcolo.search.callbacks.CapacitySearch` makes the job's return value: its GPU count if the run
meets the requirements, else +inf.

Why a bisection, and why this way. Whether n GPUs meet the SLO is monotone in n for a fixed policy (more
replicas, less load each; for a co-location policy, more GPUs for its scalable part: isolated's training
replicas beside a fixed serving part, LeMix's co-located nodes, Harli's decode GPUs beside a fixed prefill
part), so the fewest is found in ceil(log2(R + 1)) runs for R candidate counts instead of R. Hydra's basic
sweeper can only run a list fixed up front; an adaptive sweep needs a sweeper plugin, and Hydra loads
those only from the ``hydra_plugins`` package, which this project does not ship. Optuna's sweeper is
adaptive (ask, launch a batch, tell) and takes any sampler, so the bisection is a sampler: it reads the
finished trials and proposes the middle of the counts still undecided -- with ``hydra.sweeper.n_jobs = k``
parallel trials a round probes k counts, cutting the undecided range into k + 1 parts (a k-section, for
launchers with many workers). The sweeper runs exactly ``hydra.sweeper.n_trials`` trials: set it to
``k * ceil(log_{k+1}(R + 1))``; trials left once the count is pinned probe the untried counts nearest the
answer (a check of monotonicity, reported), and too few trials are reported as a range with the number of
trials still needed.

The candidate counts are ``count_key`` from ``min_count`` to ``max_count`` (settings under
``hydra.callbacks.search``) that plan (:mod:`simcolo.search.feasibility`): for a finetune layout
``policy.decode_instances`` fills the GPUs beside ``policy.prefill_instances``; a pipelines layout needs a
multiple of ``training.stages``; isolated needs room for whole training replicas beside
``policy.serving_gpus``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from simcolo.metrics.io import atomic_path
from simcolo.search.feasibility import feasibility_for
from simcolo.search.objectives import meets
from simcolo.search.space import SearchSpaceError, layout_kind, num_gpus, settings

CAPACITY_CSV = "capacity.csv"

try:
    with warnings.catch_warnings():   # optuna 2.10 on SQLAlchemy 1.4 announces SQLAlchemy 2.0's API moves
        warnings.filterwarnings("ignore", message="Deprecated API features detected", category=DeprecationWarning)
        from optuna.samplers import BaseSampler as _BaseSampler
except ImportError:  # pragma: no cover - optuna comes with hydra-optuna-sweeper
    _BaseSampler = object


def capacity_candidates(config: DictConfig, why: list[str] | None = None) -> list[tuple[int, dict[str, int]]]:
    """(count, the overrides it brings) for every count in the settings' range that plans, ascending;
    ``why`` (a list) receives ``"<count>: <reason>"`` for the others."""
    opts = settings(config)
    feas = feasibility_for(config)
    key = str(opts.count_key)
    out = []
    why = [] if why is None else why
    for c in range(int(opts.min_count), int(opts.max_count) + 1):
        layout = {key: c}
        cfg = feas.config([], layout)
        if layout_kind(cfg) == "finetune":
            layout["policy.decode_instances"] = num_gpus(cfg) - int(cfg.policy.prefill_instances)
        reason = feas.why_not([], layout)
        if reason is None:
            out.append((c, layout))
        else:
            why.append(f"{c}: {reason}")
    if not out:
        raise SearchSpaceError(f"no {key} in [{opts.min_count}, {opts.max_count}] plans: " + "; ".join(why[:4]))
    return out


def capacity_space(config: DictConfig, trial) -> None:
    """``hydra.sweeper.custom_search_space`` of ``+search=capacity``: the trial's count (drawn by the
    sampler among the candidates) and the keys it brings."""
    cands = capacity_candidates(config)
    key = str(settings(config).count_key)
    c = trial.suggest_categorical(key, [c for c, _ in cands])
    for k, v in dict(cands)[c].items():
        if k != key:
            trial.suggest_int(k, v, v)


# ------------------------------------------------------------------------------------- the bisection
def undecided(n: int, known: dict[int, bool]) -> tuple[int, int]:
    """(b, a): with ``known`` results (index -> meets) of ``n`` ascending candidates, the answer -- the
    first index that meets, ``n`` for none -- lies in [b, a]; indices b..a-1 are the undecided ones. ``a``
    is the lowest index known to meet (``n`` if none), ``b`` one above the highest known not to below it."""
    a = min((i for i, ok in known.items() if ok), default=n)
    b = max((i for i, ok in known.items() if not ok and i < a), default=-1) + 1
    return b, a


def probes(n: int, known: dict[int, bool], k: int) -> list[int]:
    """The indices one round of ``k`` parallel probes tries: the undecided b..a-1 cut into k + 1 parts of
    outcomes (answer b, ..., a) as equal as can be (k = 1: the bisection's middle). Empty once decided."""
    b, a = undecided(n, known)
    m = a - b
    if m <= 0:
        return []
    k = max(1, min(k, m))
    return sorted({b + (j * (m + 1)) // (k + 1) - 1 for j in range(1, k + 1)})


def trials_needed(n: int, k: int = 1) -> int:
    """Trials that always decide among ``n`` candidates with ``k`` parallel probes a round:
    k * ceil(log_{k+1}(n + 1))."""
    rounds, outcomes = 0, 1
    while outcomes < n + 1:
        outcomes *= k + 1
        rounds += 1
    return k * rounds


class BisectionSampler(_BaseSampler):
    """An Optuna sampler that bisects (or, with ``batch`` > 1, k-sects) the ascending categorical ``param``
    for the first choice that meets, a trial meeting when its value is finite. Other parameters are drawn
    by a seeded random sampler. Deterministic: the probes depend only on the results."""

    def __init__(self, param: str, batch: int = 1, seed: int | None = None) -> None:
        from optuna.samplers import RandomSampler

        self.param = str(param)
        self.batch = int(batch)
        self._random = RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState

        if param_name != self.param or not isinstance(param_distribution, CategoricalDistribution):
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        choices = list(param_distribution.choices)
        index = {c: i for i, c in enumerate(choices)}
        known: dict[int, bool] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            c = t.params.get(param_name)
            if c in index and t.values:
                known[index[c]] = math.isfinite(t.values[0])
        pending = [index[t.params[param_name]] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number != trial.number and param_name in t.params and t.params[param_name] in index]
        round_left = [i for i in probes(len(choices), known, self.batch) if i not in pending]
        if round_left:
            return choices[round_left[0]]
        # decided (or this round's probes are all handed out): the untried count nearest the answer
        _, a = undecided(len(choices), known)
        untried = [i for i in range(len(choices)) if i not in known and i not in pending]
        if untried:
            return choices[min(untried, key=lambda i: (abs(i - a), i < a))]
        return choices[min(a, len(choices) - 1)]


# ------------------------------------------------------------------------------------------ the answer
def capacity_table(sweep_dir: str | Path, count_key: str, slo_target: float, min_train: float) -> pd.DataFrame:
    """One row per completed probe, ascending in GPUs: the count, ``num_gpus``, SLO attainment, training
    rate, ``meets``, ``job`` and ``overrides``."""
    from simcolo.metrics.comparison import load_runs
    from simcolo.search.pareto import _overrides

    df = load_runs(sweep_dir)
    rows = []
    for _, r in df.iterrows():
        ovs = _overrides(r["run_dir"])
        count = next((o.split("=", 1)[1] for o in ovs if o.split("=", 1)[0].lstrip("+") == count_key), None)
        summary = r.to_dict()
        rows.append({count_key: int(count) if count is not None else math.nan, "num_gpus": int(r["num_gpus"]),
                     "slo_attainment": float(r["slo_attainment"]),
                     "train_flops_per_s": float(r.get("train_flops_per_s", 0.0) or 0.0),
                     "meets": meets(summary, slo_target, min_train), "job": int(r["job"]),
                     "overrides": " ".join(ovs)})
    out = pd.DataFrame(rows).sort_values(["num_gpus", "job"], kind="mergesort").reset_index(drop=True)
    out.attrs["incomplete"] = df.attrs.get("incomplete", [])
    return out


def answer(table: pd.DataFrame, count_key: str, candidates: Sequence[int] | None):
    """(the fewest count that meets or None, the highest count below it that does not or None, whether the
    probes pin it -- every candidate between the two probed -- and counts that break monotonicity)."""
    ok = table[table["meets"]]
    best = int(ok[count_key].min()) if not ok.empty else None
    below = table[(~table["meets"]) & ((table[count_key] < best) if best is not None else True)]
    lower = int(below[count_key].max()) if not below.empty else None
    cands = sorted(candidates) if candidates is not None else sorted(table[count_key].dropna().astype(int).unique())
    if best is None:
        between = [c for c in cands if lower is None or c > lower]
    else:
        between = [c for c in cands if (lower is None or c > lower) and c < best]
    broken = table[(~table["meets"]) & (table[count_key] > best)] if best is not None else table.iloc[0:0]
    return best, lower, not between, sorted(int(c) for c in broken[count_key].unique())


def _gpus(n) -> str:
    n = int(n)
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def write_capacity(sweep_dir: str | Path, count_key: str, slo_target: float, min_train: float = 0.0,
                   candidates: Sequence[int] | None = None) -> tuple[pd.DataFrame, str]:
    """Write ``capacity.csv`` (the probes, the answer's row marked) into ``sweep_dir``; returns it and the
    line naming the answer."""
    root = Path(sweep_dir)
    table = capacity_table(root, count_key, slo_target, min_train)
    best, lower, pinned, broken = answer(table, count_key, candidates)
    table["answer"] = (table[count_key] == best) if best is not None else False
    with atomic_path(root / CAPACITY_CSV) as tmp:
        table.to_csv(tmp, index=False)
    need = f"slo_attainment >= {slo_target:g}" + (f" and train_flops_per_s >= {min_train:.4g}" if min_train > 0 else "")
    probes_txt = f"{len(table)} probes: {root / CAPACITY_CSV}"
    if best is None:
        top = int(table[count_key].max()) if not table.empty else None
        if pinned:
            line = (f"capacity: none of the counts up to {count_key}={top} meets {need}; raise "
                    f"hydra.callbacks.search.max_count ({probes_txt})")
        else:
            line = (f"capacity: not decided: no probe meets {need} and counts above {count_key}={lower} are "
                    f"untried; raise hydra.sweeper.n_trials ({probes_txt})")
        return table, line
    row = table[table["answer"]].iloc[0]
    line = (f"capacity: {_gpus(row['num_gpus'])} ({count_key}={best}) "
            f"{'meets' if int(row['num_gpus']) == 1 else 'meet'} {need}")
    if lower is not None:
        lrow = table[(table[count_key] == lower) & ~table["meets"]].iloc[0]
        line += (f"; {_gpus(lrow['num_gpus'])} ({count_key}={lower}) "
                 f"{'does' if int(lrow['num_gpus']) == 1 else 'do'} not "
                 f"(slo_attainment {lrow['slo_attainment']:.4f}, train_flops_per_s {lrow['train_flops_per_s']:.4g})")
    if not pinned:
        line += f"; not pinned: counts between {lower} and {best} untried, raise hydra.sweeper.n_trials"
    if broken:
        line += f"; not monotone: {count_key}={broken} do not meet it although {best} does"
    return table, line + f" ({probes_txt})"
