"""The one interface both backends implement, and what they share.

A backend *builds* a layout plan (``simcolo.layout.plan``) on its clock: the simulated backend
(``simcolo.colocation.simulated.SimBackend``) on SimPy's, the live one (``simcolo.replay.backend.LiveBackend``)
on the wall's. Everything a run reports is read through this interface by one summary
(``simcolo.metrics.training_summary``) and one output writer (``simcolo.metrics.outputs``), so the two
backends' files mean the same.

What both do the same way lives here: binding the policy to the plan's predictor, the training records
(one row per optimizer step), what happens when a training task finishes (count it, let the data stream
replace it, offer deferred tasks again), the request-stream hooks, and the per-GPU views the summary reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from simcolo.training.learning_curve import LearningCurve


@dataclass
class TrainingRecords:
    """One row per optimizer step: when, which trainer, the version it made, what it trained.

    ``start_s`` is when the step's work began for isolated steps and finetune steps; a co-located
    node's steps overlap (tasks stream through its pipeline), so there it is NaN. Steps a trainer
    advanced in closed form arrive in blocks (``add_steps``, arrays); the frame is in the order the steps
    ended."""
    rows: list[tuple] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    DTYPES = {"trainer": np.int64, "version": np.int64, "start_s": np.float64, "end_s": np.float64,
              "tasks": np.int64, "tokens": np.int64}
    COLUMNS = tuple(DTYPES)

    def add(self, trainer: int, version: int, start_s: float, end_s: float, tasks: int, tokens: int) -> None:
        self.rows.append((trainer, version, start_s, end_s, tasks, tokens))

    def __len__(self) -> int:
        return len(self.rows) + sum(len(b["end_s"]) for b in self.blocks)

    def add_steps(self, trainer: int, first_version: int, start_s: np.ndarray, end_s: np.ndarray, tasks: int,
                  tokens: np.ndarray) -> None:
        """Steps ``first_version``, ``first_version + 1``, ... of ``trainer``, one per array element."""
        n = len(end_s)
        self.blocks.append({"trainer": np.full(n, trainer), "version": np.arange(first_version, first_version + n),
                            "start_s": start_s, "end_s": end_s, "tasks": np.full(n, tasks), "tokens": tokens})

    def frame(self) -> pd.DataFrame:
        """One row per optimizer step, in order of end time (a stable sort: steps ending together keep
        the order they were recorded in). Built column by column: a finetune week has millions of steps."""
        parts = ([dict(zip(self.COLUMNS, zip(*self.rows)))] if self.rows else []) + self.blocks
        cols = {c: np.concatenate([np.asarray(p[c], dtype=t) for p in parts]) if parts else np.empty(0, t)
                for c, t in self.DTYPES.items()}
        if self.blocks:
            order = np.argsort(cols["end_s"], kind="stable")
            cols = {c: v[order] for c, v in cols.items()}
        # the columns are arrays made here: not copied again into one block (a finetune week's 2 million steps:
        # ~40 % of the frame's time)
        return pd.DataFrame(cols, copy=False)


class Backend:
    """Built from a plan by a subclass, which sets ``cluster``, ``system`` (the ``ServingSystem``),
    ``trainers`` (each with ``report()``), ``stream`` (the training data stream) and ``training_parts``."""

    def __init__(self, run, policy, plan):
        self.run, self.policy, self.plan = run, policy, plan
        self.model = run.model
        self.training = plan.training if plan.training_on else None
        self.layout = plan.kind
        self.cost, self.interference = plan.cost, plan.interference
        self.records = TrainingRecords()
        self.trainers: list = []
        self.training_parts: list = []      # layout parts with counters(): placement, weight sync, finetune pool
        self.nodes: list = []               # co-located nodes as the policy sees them (pipelines layouts)
        self.placement = None               # colocation.nodes.TrainingPlacement (pipelines layouts)
        self.stream = None
        self.tasks_done = 0
        self.learning_curve = LearningCurve.from_config(plan.training.learning_curve) if self.training else None
        policy.bind(plan.predictor)

    @property
    def training_on(self) -> bool:
        return self.training is not None

    def _build_training(self, clock, seed: int) -> None:
        """Build the plan's trainer with the subclass's ``_pipelines``, ``_isolated`` or ``_finetune``
        (each sets ``_place``, where new training tasks go), then the training data stream on ``clock``."""
        from simcolo.layout.plan import FinetunePlan, IsolatedTrainingPlan
        from simcolo.training.data import TrainingStream

        trainer = self.plan.trainer
        if self.plan.kind == "pipelines":
            self._pipelines(trainer)      # with no training too: the nodes route requests
        elif isinstance(trainer, IsolatedTrainingPlan):
            self._isolated(trainer)
        elif isinstance(trainer, FinetunePlan):
            self._finetune(trainer)
        if self.training_on:
            self.stream = TrainingStream.from_config(clock, self.training, seed, self._place)

    # ------------------------------------------------------------------ training tasks
    def _task_done(self, task) -> None:
        """A training task finished (every trainer of both backends calls this): count it, let the data
        stream replace or retire it, and offer the tasks the policy deferred again."""
        self.tasks_done += 1
        self.stream.task_done(task)
        if self.placement is not None:
            self.placement.task_finished()

    def _tasks_recycled(self, n: int) -> None:
        """``n`` tasks of a backlog supply finished and were replaced at once, in bulk (a trainer that
        advances many steps per event; nothing was deferred, and the replacements equal the tasks)."""
        self.tasks_done += n
        self.stream.recycled(n)

    def _node_version(self, pipe) -> None:
        """A co-located node's pipeline made a new version: its serving instance serves it at once."""
        self.system.instances[pipe.index].model_version = pipe.version
        t = self.training
        self.records.add(pipe.index, pipe.version, float("nan"), self.now, t.global_batch,
                         t.global_batch * t.micro_batch * t.seq_len)

    # ------------------------------------------------------------------ the request stream
    def on_request_arrival(self) -> None:
        if self.stream is not None:
            self.stream.on_request_arrival()
        if self.placement is not None and self.policy.retry_on_arrival:
            self.placement.retry()

    def on_request_finished(self, r) -> None:
        if r.status == "finished" and self.stream is not None:
            self.stream.on_request_finished(r.prompt_tokens + r.output_tokens)
        self.policy.on_request_finished(r, self.now)

    def _on_dispatch(self, r, inst) -> None:
        self.nodes[inst.index].placed(self.now, r.prompt_tokens, False)

    # ------------------------------------------------------------------ what the summary reads
    def node_groups(self) -> list:
        """GPU groups that serve (one per instance) or only train (isolated's replicas)."""
        return [inst.gpus for inst in self.system.instances] + [list(g) for g in self.plan.train_groups]

    def training_frame(self) -> pd.DataFrame | None:
        return self.records.frame() if self.training_on else None

    def close(self, now: float) -> None:
        """End of the run (trainers count the time they are still busy)."""
