"""Does a trial's config describe a system that can exist? Checked in the sweep's own process, before
any job is launched.

A search must never launch a job whose config the simulator refuses (a split that needs more GPUs than
the cluster has, a training state that does not fit a GPU, a stage count that does not divide the
cluster): ``simcolo`` stops such a job with exit status 2, and a Hydra multirun stops with it. So the
search spaces (``simcolo.search.space``, ``simcolo.search.capacity``) offer only configs this module
accepts: it composes the trial's config exactly as the launcher will (the sweep's Hydra overrides, its
command-line overrides, the trial's), reads it into the typed config, plans the layout (every layout and
memory check, ``simcolo.layout.plan``) and builds the simulated backend on a clock that never runs (the
checks done while building: batching limits, pipeline shapes). Nothing is simulated; a check costs tens
of milliseconds and each config is checked once per sweep (:class:`Feasibility` caches the answers).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict


def override_key(override: str) -> str:
    """The key an override string sets (``+a.b=1`` -> ``a.b``; ``policy=lemix`` -> ``policy``)."""
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def plain_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that set one value (sweep expressions such as ``choice(..)``, ``interval(..)``,
    ``range(..)`` or ``a,b`` lists are the sweeper's, not a job's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    return [o for o in overrides if not parser.parse_override(o).is_sweep_override()]


def check_config(cfg: DictConfig) -> str | None:
    """None if ``cfg`` (a composed simcolo config, with or without its ``hydra`` node) plans and builds;
    else the simulator's own message (the one line ``simcolo`` would print)."""
    import numpy as np

    from simcolo.colocation.simulated import SimBackend
    from simcolo.config.run import RunConfig
    from simcolo.errors import SimcoloError
    from simcolo.hardware.cluster import Topology
    from simcolo.hardware.environment import SimEnvironment
    from simcolo.layout.plan import plan_layout
    from simcolo.metrics.itl import ITLHistogram
    from simcolo.policies import make_policy

    try:
        run = RunConfig.from_cfg(cfg)
        policy = make_policy(run.policy, np.random.default_rng([run.seed, 2]))
        plan = plan_layout(run, policy, Topology.from_config(run.gpu, run.cluster))
        SimBackend(SimEnvironment(), run, policy, plan, lambda r: None, ITLHistogram(), run.seed)
    except (SimcoloError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


class Feasibility:
    """Composes and checks trial configs of one sweep (``master``: the sweep's config, as Hydra hands it to
    the sweeper and to ``custom_search_space``), caching each answer.

    ``base`` are the overrides every trial shares: the sweep's command-line overrides (``+search=...``,
    ``cluster=...``) that are plain values. A trial's own overrides replace base overrides of the same key;
    ``hydra.*`` overrides are left out (they never reach the simulator). Composition goes through the
    running Hydra's config loader (``load_sweep_config``, what every launcher calls), so a check sees the
    config the job will. ``extra`` values (keys of the composed config, not config groups) are set on a
    copy of the composed config: one composition serves every layout of a trial.
    """

    def __init__(self, master: DictConfig):
        self.master = master
        task = OmegaConf.to_container(master.hydra.overrides.task) if "hydra" in master else []
        self.base = plain_overrides([str(o) for o in task])
        self._cache: dict[tuple, str | None] = {}
        self._configs: dict[tuple[str, ...], DictConfig] = {}
        self.policies_checked = False      # simcolo.search.space checks every policy once per sweep

    def overrides(self, trial_overrides: Sequence[str]) -> list[str]:
        mine = {override_key(o) for o in trial_overrides}
        return [o for o in self.base if override_key(o) not in mine] + list(trial_overrides)

    @staticmethod
    def _run_overrides(trial_overrides: Sequence[str]) -> tuple[str, ...]:
        return tuple(o for o in trial_overrides if not override_key(o).startswith("hydra."))

    def compose(self, trial_overrides: Sequence[str]) -> DictConfig:
        """The job config (with its ``hydra`` node) the launcher will compose for these overrides (their
        ``hydra.*`` ones aside)."""
        key = self._run_overrides(trial_overrides)
        if key not in self._configs:
            from hydra.core.global_hydra import GlobalHydra

            loader = GlobalHydra.instance().config_loader()
            self._configs[key] = loader.load_sweep_config(self.master, self.overrides(list(key)))
        return self._configs[key]

    def config(self, trial_overrides: Sequence[str], extra: Mapping[str, Any] | None = None) -> DictConfig:
        """:meth:`compose`, with ``extra`` values set on a copy."""
        cfg = self.compose(trial_overrides)
        if extra:
            cfg = copy.deepcopy(cfg)
            with open_dict(cfg):
                for k, v in extra.items():
                    OmegaConf.update(cfg, k, v, merge=True)
        return cfg

    def why_not(self, trial_overrides: Sequence[str], extra: Mapping[str, Any] | None = None) -> str | None:
        """None if the trial's config (with ``extra`` values set) plans and builds, else why not (cached)."""
        extra = dict(extra or {})
        key = (self._run_overrides(trial_overrides), tuple(sorted(extra.items())))
        if key not in self._cache:
            try:
                cfg = self.config(trial_overrides, extra)
            except Exception as exc:   # noqa: BLE001 -- a bad override: Hydra's own message
                self._cache[key] = f"{type(exc).__name__}: {exc}"
            else:
                self._cache[key] = check_config(cfg)
        return self._cache[key]

    def ok(self, trial_overrides: Sequence[str], extra: Mapping[str, Any] | None = None) -> bool:
        return self.why_not(trial_overrides, extra) is None


_SESSIONS: dict[int, Feasibility] = {}


def feasibility_for(master: DictConfig) -> Feasibility:
    """One :class:`Feasibility` per sweep (keyed by the master config object the sweeper holds)."""
    f = _SESSIONS.get(id(master))
    if f is None or f.master is not master:
        f = _SESSIONS[id(master)] = Feasibility(master)
    return f
