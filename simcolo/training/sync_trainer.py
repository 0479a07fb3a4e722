"""Isolated training: ``dp`` data-parallel pipeline replicas on dedicated GPUs, synchronous steps.

A step takes ``global_batch`` tasks (micro-batches) per replica from the queue, runs them through the
pipeline with the configured schedule (GPipe or 1F1B), then all-reduces the gradients between replicas
(ring over the slowest link between them) and runs every stage's optimizer. Each step advances the model
version by one. Every ``sync_every`` steps the new weights are sent to the serving replicas: the sync takes
``latency + replicas * weight_bytes / bandwidth`` (one sender, replicas served one after another); serving
continues meanwhile (the new weights are loaded beside the old and swapped in), and the replicas serve
the new version when it ends.

Closed form. Nothing else runs on the training GPUs, so every step is the same: its timeline is
computed once (``pipeline.step_template``, what ``pipeline.run_step`` would do event by event) and a step
is one span of ``duration_s``. Steps run back to back while tasks last, so the trainer advances a *span*
of steps as one event (``span_steps``; 1: one event per step, the same results): a span ends where a step
makes a version the weight sync sends (so the sync starts on time), where the queued tasks run out
(with a backlog supply, each finished task is replaced at once, so the supply never runs out), or where
the run ends (``close`` counts the steps done by then). The GPUs' busy clocks and the activations held
follow the template: a timeline sample mid-span sees the busy time up to that instant, and each stage
holds its step's peak activations while the trainer runs.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import deque
from typing import Callable

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask
from simcolo.training.pipeline import step_template
from simcolo.training.schedules import SCHEDULES


class SyncTrainer:
    def __init__(self, env: SimEnvironment, replicas: list[list], forward_s: list[float], backward_s: list[float],
                 optimizer_s: list[float], activation_bytes: list[float], link_s: float, allreduce_s: float,
                 global_batch: int, schedule: str, on_task_done: Callable[[TrainTask], None],
                 on_step: Callable[[int, float, float, int, int], None], sync_every: int,
                 span_steps: int | None = None):
        self.env, self.replicas = env, replicas
        S = len(replicas[0])
        self.template = step_template(forward_s, backward_s, optimizer_s, activation_bytes,
                                      SCHEDULES[schedule](S, global_batch), link_s, allreduce_s)
        self.M = global_batch
        self.link_s, self.allreduce_s = link_s, allreduce_s
        self.on_task_done, self.on_step = on_task_done, on_step
        self.sync_every = sync_every
        self.span_steps = span_steps          # most steps per event (None: no bound)
        self.recycle: Callable[[int], None] | None = None   # set for a backlog supply: n tasks done and replaced
        self.queue: deque[TrainTask] = deque()
        self.version = 0
        self.stage_busy_s = 0.0      # forward + backward time summed over stages (for the bubble rate)
        self.stage_span_s = 0.0      # stages x forward/backward span of each step
        self.sequences_done = 0
        self.tokens_done = 0
        self._span: tuple[float, list[float], list[TrainTask], int] | None = None   # start, step ends, tasks, steps
        self._holding = False
        for gpus in replicas:
            for s, g in enumerate(gpus):
                g.compute.offline = (lambda now, s=s: self._span_busy_s(s, now, partial=True))

    @property
    def tasks_per_step(self) -> int:
        return self.M * len(self.replicas)

    def place(self, task: TrainTask) -> None:
        self.queue.append(task)
        if self._span is None and len(self.queue) >= self.tasks_per_step:
            self._start_span()

    # ------------------------------------------------------------------ spans of steps
    def _start_span(self) -> None:
        now, per = self.env.now, self.tasks_per_step
        if self.recycle is not None:
            supply = None
        else:
            supply = len(self.queue) // per
        n = self.sync_every - self.version % self.sync_every
        for bound in (supply, self.span_steps):
            if bound is not None and bound < n:
                n = bound
        tasks = [self.queue.popleft() for _ in range(per * (1 if self.recycle is not None else n))]
        for t in tasks:
            t.start_s = now
        ends, t = [], now
        duration = self.template.duration_s
        for _ in range(n):
            t = t + duration
            ends.append(t)
        if not self._holding:
            self._hold_activations(True)
        self._span = (now, ends, tasks, n)
        At(self.env, ends[-1]).callbacks.append(self._span_done)

    def _span_done(self, _ev) -> None:
        self._credit(len(self._span[1]))
        if len(self.queue) >= self.tasks_per_step:
            self._start_span()
        elif self._holding:
            self._hold_activations(False)

    def _credit(self, k: int) -> None:
        """Count the span's first ``k`` steps as done: all of them, or, when the run ends, those done by
        then (the step in progress keeps its tasks out of the queue, as a step run event by event does).
        A backlog's tasks are recycled: counted as done and replaced, and the same objects queued again."""
        start, ends, tasks, n = self._span
        per, tpl = self.tasks_per_step, self.template
        # Step by step, so that a span adds up exactly as single steps do: each clock gets the same
        # additions in the same order (the clocks are independent, so they are summed one after another).
        for gpus in self.replicas:
            for s, g in enumerate(gpus):
                g.compute.add_training_busy(tpl.gpu_busy_s[s], k)
        stage_busy, stage_span = sum(tpl.busy_s), len(tpl.busy_s) * tpl.compute_end_s
        for _ in range(k * len(self.replicas)):
            self.stage_busy_s += stage_busy
            self.stage_span_s += stage_span
        recycled = self.recycle is not None
        if recycled and k:
            self.recycle(per * k)     # done, and replaced by tasks equal to them
        for i in range(k):
            step_tasks = tasks if recycled else tasks[i * per:(i + 1) * per]
            if i == 0 or not recycled:
                tokens = sum(t.tokens for t in step_tasks)
                sequences = sum(t.micro_batch for t in step_tasks)
            self.sequences_done += sequences
            self.tokens_done += tokens
            self.version += 1
            if not recycled:
                for t in step_tasks:
                    t.finish_s = ends[i]
                    self.on_task_done(t)
            self.on_step(self.version, start if i == 0 else ends[i - 1], ends[i], per, tokens)
        self._span = None
        if recycled:
            if k == n:
                self.queue.extend(tasks)   # the replacements of the last step's tasks
        elif k < n:   # the run ended mid-span: the step in progress holds its tasks, later ones took none
            self.queue.extendleft(reversed(tasks[(k + 1) * per:]))

    def _steps_done(self, now: float) -> tuple[int, float]:
        """(steps of the span in flight ended by ``now``, when the step in progress began)."""
        start, ends, _, _ = self._span
        k = bisect_right(ends, now)
        return k, (start if k == 0 else ends[k - 1])

    def _span_busy_s(self, s: int, now: float, partial: bool) -> float:
        """Stage ``s``'s GPU busy time in the span in flight up to ``now`` (not yet on its busy clock)."""
        if self._span is None:
            return 0.0
        k, step_start = self._steps_done(now)
        busy = 0.0
        for _ in range(k):
            busy += self.template.gpu_busy_s[s]
        if k == len(self._span[1]):
            return busy
        return busy + self.template.gpu_busy_until(s, now - step_start, partial)

    def _hold_activations(self, hold: bool) -> None:
        self._holding = hold
        for gpus in self.replicas:
            for s, g in enumerate(gpus):
                nbytes = self.template.peak_activation_bytes[s]
                if hold:
                    g.memory.allocate("train_activations", nbytes)
                else:
                    g.memory.release("train_activations", nbytes)

    def close(self, now: float) -> None:
        """End of the run: count the steps of the span in flight done by ``now`` and the kernels of the
        step in progress that ended by then."""
        if self._span is None:
            return
        k, step_start = self._steps_done(now)
        partial = [self.template.gpu_busy_until(s, now - step_start, False) for s in range(len(self.replicas[0]))]
        self._credit(k)
        for gpus in self.replicas:
            for s, g in enumerate(gpus):
                g.compute.add_training_busy(partial[s])

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
