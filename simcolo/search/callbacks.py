"""The searches' Hydra callbacks: each job's objectives handed to the sweeper, and the answer written at
the end of the sweep.

Each search preset (``conf/search/*.yaml``) puts one of these at ``hydra.callbacks.search``; its keys are
the search's settings (``hydra.callbacks.search.slo_target=0.95`` on the command line). They sit in
Hydra's node because a run's config refuses keys it does not know, and ``hydra.*`` never reaches the
simulator.

* ``on_job_end`` runs where the job ran (a local process, a Ray worker, a SLURM job): it reads the job's
  ``summary.json`` and makes the objectives the job's return value, which the Optuna sweeper tells its
  study (the ``simcolo`` command itself returns only the SLO attainment).
* ``on_multirun_end`` runs in the sweep's process: ``pareto.csv`` and ``pareto.png``
  (:class:`ColocationSearch`) or ``capacity.csv`` (:class:`CapacitySearch`) in the sweep directory, and
  the answer on stdout.

Hydra turns an exception raised in a callback into a warning; a job that wrote no summary keeps the
return value it had (and the sweeper marks its trial failed).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simcolo.search.objectives import directions_of, job_objectives, meets, read_summary

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


def _completed(job_return) -> bool:
    from hydra.core.utils import JobStatus

    return getattr(job_return, "status", None) == JobStatus.COMPLETED


class ColocationSearch(_HydraCallback):
    """Settings and callback of ``+search=colocation`` (keys under ``hydra.callbacks.search``):

    * ``objectives``: summary keys the sweeper optimises, in the order of ``hydra.sweeper.direction``;
    * ``slo_target``: the SLO attainment a recommendation must reach (null: none);
    * ``stages``: pipeline depths the isolated and pipelines layouts may use;
    * ``space``: per policy, its knobs and their ranges (``simcolo.search.space``);
    * ``split``, ``intensity``: the policy-neutral genes each trial sets (``simcolo.search.space``);
    * ``intensity_key``, ``intensity_range``, ``intensity_log``: the config key the intensity gene sets, its
      range and scale;
    * ``plot``: draw ``pareto.png``.
    """

    def __init__(self, objectives: Sequence[str] = ("train_flops_per_s", "slo_attainment"),
                 slo_target: float | None = 0.99, plot: bool = True, stages: Sequence[int] = (1, 2, 4, 8),
                 space: Any = None, split: float = 0.0, intensity: float = 0.0,
                 intensity_key: str | None = "training.data.backlog", intensity_range: Sequence[int] = (1, 64),
                 intensity_log: bool = True) -> None:
        self.objectives = [str(k) for k in objectives]
        self.slo_target = None if slo_target is None else float(slo_target)
        self.plot = bool(plot)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        """Objectives and the sweeper's directions must pair up (a warning from Hydra otherwise)."""
        directions_of(config.hydra.sweeper.direction, len(self.objectives))

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        if _completed(job_return):
            vals = job_objectives(config, self.objectives)
            if vals is not None:
                job_return.return_value = vals if len(vals) > 1 else vals[0]

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from simcolo.search.pareto import describe, write_pareto

        directions = directions_of(config.hydra.sweeper.direction, len(self.objectives))
        root = Path(str(config.hydra.sweep.dir))
        runs, front, best = write_pareto(root, self.objectives, directions, self.slo_target, self.plot)
        print("\n" + describe(runs, front, best, self.objectives, self.slo_target, root), flush=True)


class CapacitySearch(_HydraCallback):
    """Settings and callback of ``+search=capacity`` (keys under ``hydra.callbacks.search``):

    * ``slo_target``: the SLO attainment a GPU count must reach;
    * ``min_train_flops_per_s``: the training rate it must sustain as well (0: serving alone);
    * ``count_key``, ``min_count``, ``max_count``: the config key that sets the GPU count and its range
      (``cluster.gpus_per_node`` from 1 to 16: one node of that many GPUs).

    A job's return value is its GPU count if it meets both requirements, else +inf (the sweeper
    minimises it; :class:`simcolo.search.capacity.BisectionSampler` reads it).
    """

    def __init__(self, slo_target: float = 0.99, min_train_flops_per_s: float = 0.0,
                 count_key: str = "cluster.gpus_per_node", min_count: int = 1, max_count: int = 16) -> None:
        self.slo_target = float(slo_target)
        self.min_train = float(min_train_flops_per_s)
        self.count_key = str(count_key)

    def meets(self, summary: dict) -> bool:
        return meets(summary, self.slo_target, self.min_train)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        """Before the sweeper exists: the candidate counts (the ones that plan), and, with
        ``hydra.sweeper.n_trials=0``, exactly the trials the bisection needs for them."""
        from omegaconf import read_write

        from simcolo.search.capacity import capacity_candidates, trials_needed

        sweeper = config.hydra.sweeper
        k = int(sweeper.n_jobs)
        why: list[str] = []
        try:
            counts = [c for c, _ in capacity_candidates(config, why)]
        except Exception:   # noqa: BLE001 -- capacity_space raises it again, before any job, with its message
            counts = list(range(int(config.hydra.callbacks.search.min_count),
                                int(config.hydra.callbacks.search.max_count) + 1))
        auto = not sweeper.n_trials
        if auto:
            with read_write(sweeper):
                sweeper.n_trials = trials_needed(len(counts), k)
        print(f"capacity: {len(counts)} candidate counts plan ({self.count_key} = {', '.join(map(str, counts))}); "
              f"{sweeper.n_trials} trials, {k} at a time"
              + (" (hydra.sweeper.n_trials=0: as many as the bisection needs)" if auto else "")
              + (f"; {len(why)} do not plan, e.g. {why[-1]}" if why and counts else ""), flush=True)

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        if not _completed(job_return):
            return
        summary = read_summary(str(config.hydra.runtime.output_dir))
        if summary is not None:
            job_return.return_value = float(summary["num_gpus"]) if self.meets(summary) else math.inf

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from simcolo.search.capacity import capacity_candidates, write_capacity

        root = Path(str(config.hydra.sweep.dir))
        try:
            candidates = [c for c, _ in capacity_candidates(config)]
        except Exception:   # noqa: BLE001 -- outside the sweep's Hydra (e.g. a rebuilt report): the probed counts only
            candidates = None
        _, line = write_capacity(root, self.count_key, self.slo_target, self.min_train, candidates)
        print("\n" + line, flush=True)
