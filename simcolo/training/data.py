"""The training data stream: training *tasks* (one micro-batch of packed sequences each) arriving over
the backend's clock (simulated or live).

Kinds (``training.data.kind``):

* ``backlog`` — a closed loop: ``backlog`` tasks are outstanding at all times; each completed task is
  replaced at once by a new one. Training is never starved: measures how much training fits.
* ``poisson`` — tasks arrive as a Poisson process at ``rate_tps`` tasks/s; or, with ``share`` set,
  every inference arrival brings Poisson(share / (1 - share)) training tasks, so training is on average
  ``share`` of all tasks (LeMix's "training share of tasks").
* ``requests`` — continuous retraining on served traffic: each finished request's prompt + output
  tokens are packed into sequences; every ``micro_batch * seq_len`` tokens make a task.
* ``jobs`` — finetune jobs (model-as-a-service) arrive as a Poisson process at ``job_rate_per_s``, each
  with ``job_tasks`` tasks; the first job arrives at time 0.

Random draws come from a generator seeded with (run seed, 1), separate from the workload's, so a
training stream never changes the request stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from simcolo.config.training import Training, TrainingData


@dataclass(slots=True, eq=False)
class TrainTask:
    id: int
    arrival_s: float
    micro_batch: int         # sequences
    seq_len: int             # tokens per sequence
    job: int = -1
    node: int = -1           # where it was placed
    home: int = -1           # a backlog's replacement: the node its predecessor finished on (-1: none)
    start_s: float = -1.0    # entered its pipeline
    finish_s: float = -1.0   # backward of its first stage done

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


class TrainingStream:
    """The tasks of ``data`` (a validated ``config.training.TrainingData``), each ``micro_batch`` sequences
    of ``seq_len`` tokens, handed to ``on_task`` as they arrive. ``clock`` is the backend's: it has ``now``
    and ``call_at(t, fn)`` (the SimPy environment, or the live replay's clock), so the same stream feeds
    a simulation and a replay."""

    def __init__(self, clock, data: "TrainingData", micro_batch: int, seq_len: int, seed: int,
                 on_task: Callable[[TrainTask], None]):
        self.env, self.kind = clock, data.kind
        self.micro_batch, self.seq_len = micro_batch, seq_len
        self.on_task = on_task
        self.rng = np.random.default_rng([int(seed), 1])
        self.created = 0
        self.completed = 0
        self._tokens_buffered = 0
        self._share_mean = 0.0
        if data.kind == "backlog":
            n = data.backlog
            if n:
                clock.call_at(clock.now, lambda: [self._new() for _ in range(n)])
        elif data.kind == "poisson":
            if data.share is not None:
                self._share_mean = data.share / (1 - data.share)
            else:
                self._rate = data.rate_tps
                self._schedule_poisson()
        elif data.kind == "jobs":
            self._job_rate, self._job_tasks = data.job_rate_per_s, data.job_tasks
            self._jobs = 0
            clock.call_at(clock.now, self._job)

    @classmethod
    def from_config(cls, clock, training: "Training", seed: int,
                    on_task: Callable[[TrainTask], None]) -> "TrainingStream":
        """The stream of a typed training config (``simcolo.config.FullTraining`` or ``LoraFinetune``)."""
        return cls(clock, training.data, training.micro_batch, training.seq_len, seed, on_task)

    def _new(self, job: int = -1, home: int = -1) -> None:
        task = TrainTask(self.created, self.env.now, self.micro_batch, self.seq_len, job, home=home)
        self.created += 1
        self.on_task(task)

    def _schedule_poisson(self) -> None:
        self.env.call_at(self.env.now + float(self.rng.exponential(1.0 / self._rate)), self._poisson)

    def _poisson(self) -> None:
        self._new()
        self._schedule_poisson()

    def _job(self) -> None:
        job = self._jobs
        self._jobs += 1
        for _ in range(self._job_tasks):
            self._new(job)
        self.env.call_at(self.env.now + float(self.rng.exponential(1.0 / self._job_rate)), self._job)

    # ------------------------------------------------------------------ hooks from the run
    def on_request_arrival(self) -> None:
        if self._share_mean:
            for _ in range(int(self.rng.poisson(self._share_mean))):
                self._new()

    def on_request_finished(self, tokens: int) -> None:
        if self.kind == "requests":
            self._tokens_buffered += tokens
            per_task = self.micro_batch * self.seq_len
            while self._tokens_buffered >= per_task:
                self._tokens_buffered -= per_task
                self._new()

    def recycled(self, n: int) -> None:
        """A backlog's ``n`` tasks finished and were replaced by tasks equal to them (counted, not built)."""
        if self.kind != "backlog":
            raise ValueError(f"only a backlog supply replaces tasks in bulk, not '{self.kind}'")
        self.completed += n
        self.created += n

    def task_done(self, task: TrainTask) -> None:
        self.completed += 1
        if self.kind == "backlog":
            self._new(home=task.node)
