"""The co-location search space: a policy, a split of the GPUs, training intensity and the policy's knobs,
every trial a config the simulator accepts.

Hydra's Optuna sweeper draws the parameters every trial shares from ``hydra.sweeper.params`` -- the
policy and two policy-neutral genes in [0, 1], ``hydra.callbacks.search.split`` and
``hydra.callbacks.search.intensity`` -- and then calls :func:`colocation_space`
(``hydra.sweeper.custom_search_space``) for the keys they stand for, which depend on the policy drawn:

* **the split** of the cluster's GPUs between serving and training, as the policy's layout expresses it:

  - ``isolated``: ``policy.serving_gpus`` serve, the rest train as replicas of ``training.stages`` GPUs
    (every stage count of ``hydra.callbacks.search.stages`` that leaves a whole number of replicas);
  - ``lemix``, ``mix_rr``, ``mix_luf``, ``mix_random``: ``training.stages`` GPUs per co-located node
    (each node serves one replica and trains it as a pipeline), a stage count dividing the cluster;
  - ``harli``, ``static_share``, ``flexllm``: ``policy.prefill_instances`` prefill GPUs and
    ``policy.decode_instances`` decode GPUs (where LoRA finetuning runs), together filling the cluster.

  The layouts of the policy that plan on this cluster, model and GPU (:mod:`simcolo.search.feasibility`)
  are ordered from the most GPUs serving to the most training, and ``split`` picks one (0: the first,
  1: the last).
* **training intensity**: ``intensity_key`` (``training.data.backlog``, the training tasks outstanding)
  in ``intensity_range``, narrowed to the values that plan with the layout (isolated needs at least one
  step's tasks), ``intensity`` placing it in that range (geometrically with ``intensity_log``).
* **the policy's knobs**: ``hydra.callbacks.search.space.<policy>``, config keys (nested as in the run's
  config: ``policy: {max_micro_batch: ...}``) and their ranges in the sweeper's own syntax (``interval(1.0, 20.0)``, ``tag(log, interval(1, 64))``, ``int(interval(1, 8))``,
  ``choice(a, b)``). An integer knob is searched only over the values that plan with the layout (a
  ``policy.max_micro_batch`` whose static carve-out must fit, a ``training.max_inflight`` whose activations
  must).

The derived keys are recorded as fixed-value parameters (``policy.serving_gpus=6``), so every trial's
overrides name its whole config. Being parameters of every trial, the two genes are what NSGA-II crosses
and mutates across policies; the per-policy knobs, which only some trials have, it samples at random
(Optuna's rule for a conditional space). A policy with no layout on the cluster stops the search before
any job runs, naming it and why. Everything is deterministic for a seed: the layouts are enumerated in a
fixed order and the sampler is seeded.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simcolo.errors import ConfigError
from simcolo.search.feasibility import Feasibility, feasibility_for

#: Where the search's settings live: a Hydra callback node (the run config refuses unknown top-level keys,
#: ``hydra.*`` is the one place a search setting can sit without reaching the simulator).
SETTINGS = "hydra.callbacks.search"
SPLIT_KEY = f"{SETTINGS}.split"
INTENSITY_KEY = f"{SETTINGS}.intensity"


class SearchSpaceError(ConfigError):
    """The search space offers no config the simulator accepts (a policy with no layout on this cluster, a
    knob range with no feasible value)."""


def settings(config: DictConfig) -> DictConfig:
    node = OmegaConf.select(config, SETTINGS)
    if node is None:
        raise SearchSpaceError(f"{SETTINGS} is not set: run a search preset (simcolo -m +search=colocation)")
    return node


def num_gpus(cfg: DictConfig) -> int:
    return int(cfg.cluster.num_nodes) * int(cfg.cluster.gpus_per_node)


def layout_kind(cfg: DictConfig) -> str:
    from simcolo.policies import POLICIES

    return POLICIES[str(cfg.policy.name)].layout


def candidate_layouts(kind: str, n: int, stages: list[int]) -> list[dict[str, int]]:
    """Every split of ``n`` GPUs a layout of ``kind`` can take, from the most GPUs serving to the most
    training (before any memory check)."""
    if kind == "isolated":
        out = [(n - s, S, {"training.stages": S, "policy.serving_gpus": s})
               for S in stages for s in range(1, n) if n - s >= S and (n - s) % S == 0]
        return [d for _, _, d in sorted(out, key=lambda t: (t[0], t[1]))]
    if kind == "pipelines":
        return [{"training.stages": S} for S in sorted(stages) if S <= n and n % S == 0]
    if kind == "finetune":
        return [{"policy.prefill_instances": n - d, "policy.decode_instances": d} for d in range(1, n)]
    return [{}]


def _items(d: Mapping[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def feasible_layouts(feas: Feasibility, so_far: list[str], stages: list[int],
                     extra: Mapping[str, Any] | None = None) -> tuple[list[dict], list[str]]:
    """The layouts that plan with the trial's overrides ``so_far`` (their policy's) and ``extra`` values,
    and why the others do not."""
    cfg = feas.compose(so_far)
    kind = layout_kind(cfg)
    ok, why = [], []
    for layout in candidate_layouts(kind, num_gpus(cfg), stages):
        reason = feas.why_not(so_far, {**(extra or {}), **layout})
        if reason is None:
            ok.append(layout)
        else:
            why.append(f"{' '.join(_items(layout)) or '(default layout)'}: {reason}")
    return ok, why


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{policy: {max_micro_batch: "int(interval(1, 8))"}}`` -> ``{"policy.max_micro_batch": ...}``."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _distribution(key: str, spec: Any):
    """An Optuna distribution from the sweeper's syntax (``interval(..)``, ``range(..)``, ``choice(..)``,
    ``tag(log, ..)``), parsed exactly as ``hydra.sweeper.params`` entries are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import (
        create_optuna_distribution_from_override,
    )

    override = OverridesParser.create().parse_override(f"{key}={spec}")
    return create_optuna_distribution_from_override(override)


def feasible_interval(grid: list[int], ok) -> tuple[int, int] | None:
    """The first and last index of ``grid`` whose value passes ``ok``, assuming the passing values form one
    interval (a knob that sizes memory passes up to a limit, a backlog from one step's tasks up); checked
    at the ends, then by bisection on the failing side. None if no value passes."""
    first, last = ok(grid[0]), ok(grid[-1])
    n = len(grid)
    if first and last:
        return 0, n - 1
    if first or last:
        lo, hi = (0, n - 1) if first else (n - 1, 0)   # grid[lo] passes, grid[hi] fails
        while abs(hi - lo) > 1:
            mid = (lo + hi) // 2
            if ok(grid[mid]):
                lo = mid
            else:
                hi = mid
        return (0, lo) if first else (lo, n - 1)
    passing = [i for i in range(1, n - 1) if ok(grid[i])]   # both ends fail: look inside
    return (passing[0], passing[-1]) if passing else None


def _int_grid(dist) -> list[int] | None:
    from optuna.distributions import IntLogUniformDistribution, IntUniformDistribution

    if isinstance(dist, IntUniformDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, IntLogUniformDistribution):
        return list(range(dist.low, dist.high + 1))
    return None


def _restrict_int(feas: Feasibility, so_far: list[str], chosen: dict, key: str, dist):
    """An integer knob's distribution narrowed to the values that plan with the trial's overrides and
    ``chosen`` values (its other kinds are returned as they are)."""
    from optuna.distributions import IntLogUniformDistribution, IntUniformDistribution

    grid = _int_grid(dist)
    if grid is None:
        return dist
    span = feasible_interval(grid, lambda v: feas.ok(so_far, {**chosen, key: v}))
    if span is None:
        raise SearchSpaceError(f"{key}: no value in [{grid[0]}, {grid[-1]}] plans with {' '.join(so_far)} "
                               f"{' '.join(_items(chosen))}: {feas.why_not(so_far, {**chosen, key: grid[0]})}")
    lo, hi = grid[span[0]], grid[span[1]]
    if isinstance(dist, IntUniformDistribution):
        return IntUniformDistribution(lo, hi, step=dist.step)
    return IntLogUniformDistribution(lo, hi)


def gene_value(u: float, lo: int, hi: int, log: bool) -> int:
    """The integer in [lo, hi] at position ``u`` in [0, 1] (geometric with ``log``)."""
    u = min(max(float(u), 0.0), 1.0)
    if hi <= lo:
        return lo
    if log and lo > 0:
        v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    else:
        v = lo + u * (hi - lo)
    return int(min(max(round(v), lo), hi))


def _check_policies(feas: Feasibility, trial, fixed_overrides: list[str], stages: list[int],
                    permissive: dict) -> None:
    """Once per sweep: every policy the sweeper may draw has a layout on this cluster (else stop before any
    job runs, naming the policy and why)."""
    from optuna.distributions import CategoricalDistribution

    dist = trial.distributions.get("policy")
    if not isinstance(dist, CategoricalDistribution) or feas.policies_checked:
        return
    bad = []
    for policy in dist.choices:
        layouts, why = feasible_layouts(feas, fixed_overrides + [f"policy={policy}"], stages, permissive)
        if not layouts:
            bad.append(f"{policy} ({'; '.join(why[:3])})")
    feas.policies_checked = True
    if bad:
        raise SearchSpaceError(f"no layout plans on this cluster ({' '.join(feas.base)}) for: {', '.join(bad)}; "
                               f"leave them out of hydra.sweeper.params.policy")


def colocation_space(config: DictConfig, trial) -> None:
    """``hydra.sweeper.custom_search_space`` of ``+search=colocation``: adds the drawn policy's layout,
    training intensity and knobs to ``trial`` (see the module docstring). ``config`` is the sweep's config."""
    opts = settings(config)
    feas = feasibility_for(config)
    stages = [int(s) for s in opts.stages]
    params = dict(trial.params)
    fixed = dict(trial.user_attrs)
    so_far = _items(params) + _items(fixed)
    ikey = OmegaConf.select(opts, "intensity_key")
    irange_raw = list(OmegaConf.select(opts, "intensity_range", default=[1, 64]))
    irange = [int(v) for v in irange_raw]
    derive_intensity = ikey is not None and ikey not in params and ikey not in fixed
    permissive = {ikey: irange_raw[-1]} if derive_intensity else {}
    _check_policies(feas, trial, _items(fixed), stages, permissive)

    layouts, why = feasible_layouts(feas, so_far, stages, permissive)
    if not layouts:
        raise SearchSpaceError(f"{' '.join(so_far)}: no layout plans on this cluster: " + "; ".join(why))
    layout = layouts[min(int(float(params.get(SPLIT_KEY, 0.0)) * len(layouts)), len(layouts) - 1)]
    chosen = dict(layout)

    if derive_intensity:
        u = float(params.get(INTENSITY_KEY, 1.0))
        log = bool(OmegaConf.select(opts, "intensity_log", default=True))
        if all(float(v).is_integer() for v in irange_raw):
            grid = list(range(irange[0], irange[-1] + 1))
            span = feasible_interval(grid, lambda v: feas.ok(so_far, {**chosen, ikey: v}))
            if span is None:
                raise SearchSpaceError(f"{ikey}: no value in {irange} plans with "
                                       f"{' '.join(so_far + _items(chosen))}")
            chosen[ikey] = gene_value(u, grid[span[0]], grid[span[1]], log)
        else:   # a fraction (training.data.share): placed in the range as it is
            lo, hi = float(irange_raw[0]), float(irange_raw[-1])
            chosen[ikey] = (math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if log and lo > 0
                            else lo + u * (hi - lo))
    for key, value in chosen.items():
        if isinstance(value, float):
            trial.suggest_float(key, value, value)
        else:
            trial.suggest_int(key, value, value)

    policy = str(feas.compose(so_far).policy.name)
    knobs = flatten(OmegaConf.select(opts, f"space.{policy}"))
    for key, spec in knobs.items():
        if key in params or key in fixed or key in chosen:
            continue      # a key of hydra.sweeper.params wins
        dist = _restrict_int(feas, so_far, chosen, key, _distribution(key, spec))
        chosen[key] = trial._suggest(key, dist)
    final = so_far + _items(chosen)
    reason = feas.why_not(final)          # composed as the launcher will, every override a string
    if reason is not None:
        raise SearchSpaceError(f"trial {trial.number} ({' '.join(final)}) does not plan: {reason}; narrow the "
                               f"knob ranges in {SETTINGS}.space.{policy}")
