"""The training data stream: training *tasks* (one micro-batch of packed sequences each) arriving over
simulated time.

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

from simcolo.errors import ConfigError
from simcolo.hardware.environment import At, SimEnvironment

if TYPE_CHECKING:
    from simcolo.config.training import Training

KINDS = ("backlog", "poisson", "requests", "jobs")


@dataclass(slots=True, eq=False)
class TrainTask:
    id: int
    arrival_s: float
    micro_batch: int         # sequences
    seq_len: int             # tokens per sequence
    job: int = -1
    node: int = -1           # where it was placed
    start_s: float = -1.0    # entered its pipeline
    finish_s: float = -1.0   # backward of its first stage done

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


class TrainingStream:
    def __init__(self, env: SimEnvironment, cfg, micro_batch: int, seq_len: int, seed: int,
                 on_task: Callable[[TrainTask], None]):
        kind = cfg["kind"]
        if kind not in KINDS:
            raise ConfigError(f"training.data.kind '{kind}' is unknown; expected one of {KINDS}")
        self.env, self.kind, self.cfg = env, kind, cfg
        self.micro_batch, self.seq_len = micro_batch, seq_len
        self.on_task = on_task
        self.rng = np.random.default_rng([int(seed), 1])
        self.created = 0
        self.completed = 0
        self._tokens_buffered = 0
        self._share_mean = 0.0
        if kind == "backlog":
            n = int(cfg["backlog"])
            if n < 0:
                raise ConfigError(f"training.data.backlog must be >= 0, got {n}")
            if n:
                At(env, env.now).callbacks.append(lambda _ev: [self._new() for _ in range(n)])
        elif kind == "poisson":
            rate, share = cfg["rate_tps"], cfg["share"]
            if (rate is None) == (share is None):
                raise ConfigError("training.data.kind=poisson needs exactly one of rate_tps and share")
            if share is not None:
                share = float(share)
                if not 0 < share < 1:
                    raise ConfigError(f"training.data.share must be in (0, 1), got {share}")
                self._share_mean = share / (1 - share)
            else:
                self._rate = float(rate)
                if self._rate <= 0:
                    raise ConfigError(f"training.data.rate_tps must be > 0, got {rate}")
                self._schedule_poisson()
        elif kind == "jobs":
            self._job_rate, self._job_tasks = float(cfg["job_rate_per_s"]), int(cfg["job_tasks"])
            if self._job_rate <= 0 or self._job_tasks < 1:
                raise ConfigError("training.data: job_rate_per_s must be > 0 and job_tasks >= 1")
            self._jobs = 0
            At(env, env.now).callbacks.append(self._job)

    @classmethod
    def from_config(cls, env: SimEnvironment, training: "Training", seed: int,
                    on_task: Callable[[TrainTask], None]) -> "TrainingStream":
        """The stream of a typed training config (``simcolo.config.FullTraining`` or ``LoraFinetune``): its
        ``data``, tasks of ``micro_batch`` sequences of ``seq_len`` tokens."""
        return cls(env, training.data.as_mapping(), training.micro_batch, training.seq_len, seed, on_task)

    def _new(self, job: int = -1) -> None:
        task = TrainTask(self.created, self.env.now, self.micro_batch, self.seq_len, job)
        self.created += 1
        self.on_task(task)

    def _schedule_poisson(self) -> None:
        At(self.env, self.env.now + float(self.rng.exponential(1.0 / self._rate))).callbacks.append(self._poisson)

    def _poisson(self, _ev) -> None:
        self._new()
        self._schedule_poisson()

    def _job(self, _ev) -> None:
        job = self._jobs
        self._jobs += 1
        for _ in range(self._job_tasks):
            self._new(job)
        At(self.env, self.env.now + float(self.rng.exponential(1.0 / self._job_rate))).callbacks.append(self._job)

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

    def task_done(self, task: TrainTask) -> None:
        self.completed += 1
        if self.kind == "backlog":
            self._new()
