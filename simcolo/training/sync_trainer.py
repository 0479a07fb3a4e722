"""Isolated training: ``dp`` data-parallel pipeline replicas on dedicated GPUs, synchronous steps.

A step takes ``global_batch`` tasks (micro-batches) per replica from the queue, runs them through the
pipeline with the configured schedule (GPipe or 1F1B; ``simcolo.training.pipeline.run_step``), then
all-reduces the gradients between replicas (ring over the slowest link between them) and runs every
stage's optimizer. Each step advances the model version by one. Every ``sync_every`` steps the new
weights are sent to the serving replicas: the sync takes ``latency + replicas * weight_bytes /
bandwidth`` (one sender, replicas served one after another); serving continues meanwhile (the new
weights are loaded beside the old and swapped in), and the replicas serve the new version when it ends.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask
from simcolo.training.pipeline import StageSpec, run_step
from simcolo.training.schedules import SCHEDULES


class SyncTrainer:
    def __init__(self, env: SimEnvironment, replicas: list[list], forward_s: list[float], backward_s: list[float],
                 optimizer_s: list[float], activation_bytes: list[float], link_s: float, allreduce_s: float,
                 global_batch: int, schedule: str, on_task_done: Callable[[TrainTask], None],
                 on_step: Callable[[int, float, float, int, int], None]):
        self.env, self.replicas = env, replicas
        self.stages = [[StageSpec(g.compute, forward_s[s], backward_s[s], 0.0, g.memory, activation_bytes[s])
                        for s, g in enumerate(gpus)] for gpus in replicas]
        self.optimizer_s = optimizer_s
        self.link_s, self.allreduce_s = link_s, allreduce_s
        self.M = global_batch
        self.schedule = SCHEDULES[schedule](len(replicas[0]), global_batch)
        self.on_task_done, self.on_step = on_task_done, on_step
        self.queue: deque[TrainTask] = deque()
        self.version = 0
        self.stage_busy_s = 0.0      # forward + backward time summed over stages (for the bubble rate)
        self.stage_span_s = 0.0      # stages x forward/backward span of each step
        self.sequences_done = 0
        self.tokens_done = 0
        self._running = False

    @property
    def tasks_per_step(self) -> int:
        return self.M * len(self.replicas)

    def place(self, task: TrainTask) -> None:
        self.queue.append(task)
        if not self._running and len(self.queue) >= self.tasks_per_step:
            self._running = True
            self.env.process(self._step())

    def _step(self):
        env = self.env
        while len(self.queue) >= self.tasks_per_step:
            tasks = [self.queue.popleft() for _ in range(self.tasks_per_step)]
            start = env.now
            for t in tasks:
                t.start_s = start
            runs = [run_step(env, stages, self.schedule, self.link_s) for stages in self.stages]
            yield env.all_of([p for p, _ in runs])
            for _, result in runs:
                self.stage_busy_s += sum(result.busy_s)
                self.stage_span_s += len(result.busy_s) * (result.compute_end_s - result.start_s)
            if self.allreduce_s > 0:
                yield env.timeout(self.allreduce_s)
            yield env.all_of([g.compute.run("optimizer", self.optimizer_s[s])
                              for gpus in self.replicas for s, g in enumerate(gpus)])
            self.version += 1
            for t in tasks:
                t.finish_s = env.now
                self.sequences_done += t.micro_batch
                self.tokens_done += t.tokens
                self.on_task_done(t)
            self.on_step(self.version, start, env.now, len(tasks), sum(t.tokens for t in tasks))
        self._running = False

    def report(self) -> TrainerReport:
        return TrainerReport(self.sequences_done, self.tokens_done, self.stage_busy_s, self.stage_span_s,
                             {"train_queued_tasks": len(self.queue)})


class WeightSync:
    """Sends the trainer's version to the serving instances every ``every`` steps (one sync at a time;
    a sync due while one is running starts when it ends, with the newest version)."""

    def __init__(self, env: SimEnvironment, instances: list, every: int, sync_s: float):
        self.env, self.instances, self.every, self.sync_s = env, instances, every, sync_s
        self.latest = 0
        self.syncing = False
        self.syncs = 0

    def counters(self) -> dict:
        return {"weight_syncs": self.syncs}

    def on_version(self, version: int) -> None:
        self.latest = version
        if version % self.every == 0 and not self.syncing:
            self._start()

    def _start(self) -> None:
        self.syncing = True
        version = self.latest
        At(self.env, self.env.now + self.sync_s).callbacks.append(lambda _ev: self._done(version))

    def _done(self, version: int) -> None:
        for inst in self.instances:
            inst.model_version = version
        self.syncs += 1
        self.syncing = False
        if self.latest // self.every > version // self.every:
            self._start()
