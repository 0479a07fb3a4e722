"""Live training: real forward, backward and AdamW steps of the model, each trainer in its own thread
(its own CUDA stream), fed by a closed-loop task stream.

* :class:`NodeTrainer` — co-located (``pipelines`` layout, one stage per node): trains the very module the
  node's serving instance serves (LeMix: the serving replica is the training replica), so each optimizer
  step is served at once; tasks run in placement order, each forward + backward, an optimizer step
  every ``global_batch`` tasks; a forward waits for the policy's memory gate, as in the simulator.
* :class:`SyncTrainer` — isolated: its own replica on its own GPU; a step = ``global_batch`` tasks +
  the optimizer; every ``sync_every`` steps the weights are copied into every serving replica (a real
  device-to-device copy) and the replicas serve the new version from then on.

A task's tokens are random (seeded by the task id): training throughput does not depend on the data.
"""
from __future__ import annotations

import math
import threading
from collections import deque

import torch

from simcolo.errors import ConfigError
from simcolo.training.data import TrainTask


class TaskStream:
    """``training.data.kind=backlog``: ``backlog`` tasks outstanding at all times (the live backend
    supports only this closed loop; the simulator's other kinds need a clock-driven generator)."""

    def __init__(self, cfg, micro_batch: int, seq_len: int, live, place):
        if cfg["kind"] != "backlog":
            raise ConfigError(f"training.data.kind='{cfg['kind']}': the live replay supports only 'backlog'")
        self.backlog = int(cfg["backlog"])
        if self.backlog < 1:
            raise ConfigError(f"training.data.backlog must be >= 1 in a replay, got {self.backlog}")
        self.micro_batch, self.seq_len, self.live, self.place = micro_batch, seq_len, live, place
        self.created = 0
        self.completed = 0

    def start(self) -> None:
        for _ in range(self.backlog):
            self._new()

    def _new(self) -> None:
        task = TrainTask(self.created, self.live.now, self.micro_batch, self.seq_len)
        self.created += 1
        self.place(task)

    def task_done(self, task: TrainTask) -> None:
        self.completed += 1
        self._new()


class LiveTrainer:
    """Thread, task queue and kernels shared by both trainers."""

    def __init__(self, index: int, worker, device: torch.device, gpu: int, live, global_batch: int, on_task_done,
                 on_step):
        """``worker`` runs the kernels (``train_process``: in this thread, or in a child process) on
        cluster GPU ``gpu`` (torch ``device``)."""
        self.index, self.worker, self.device, self.gpu, self.live = index, worker, device, gpu, live
        self.global_batch = global_batch
        self.on_task_done, self.on_step = on_task_done, on_step
        self.queue: deque[TrainTask] = deque()
        self.version = 0
        self.tasks_done = 0
        self.train_busy_s = 0.0
        self.solo_s = [0.0, 0.0]      # (measured, predicted) of work that ran with no serving beside it
        self.predicted_s = (0.0, 0.0, 0.0)   # forward, backward, optimizer of one task, set by the backend
        self._cond = live.condition()
        self.thread = threading.Thread(target=self._main, name=f"trainer-{index}", daemon=True)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def place(self, task: TrainTask) -> None:
        """Called under the replay's lock."""
        self.queue.append(task)
        self._cond.notify()

    def start(self) -> None:
        self.thread.start()

    def stop_and_join(self, timeout: float | None = None) -> None:
        with self._cond:
            self._cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _main(self) -> None:
        self.live.run_guarded(f"trainer {self.index}", self.device, self._train)

    def warm_up(self, iterations: int, micro_batch: int, seq_len: int) -> None:
        tasks = [TrainTask(-1 - i, 0.0, micro_batch, seq_len) for i in range(iterations)]
        self.worker.step(self.index, tasks, True)

    def _train(self) -> None:
        raise NotImplementedError


class NodeTrainer(LiveTrainer):
    """The training side of a co-located node (one stage): implements what ``colocation.nodes.Node``
    reads of a pipeline (``S``, ``stage_backlog_s``)."""

    S = 1

    def __init__(self, *args, forward_s: float, backward_s: float, instance, pool, activation_bytes: float,
                 gate=None, **kw):
        super().__init__(*args, **kw)
        self.f, self.b = forward_s, backward_s
        self.instance, self.pool, self.activation_bytes = instance, pool, activation_bytes
        self.gate = gate
        self._running_since: float | None = None   # the running task's start (for the backlog)
        self.busy = False                          # a kernel (task or optimizer step) is running

    def stage_backlog_s(self, stage: int) -> float:
        """Predicted solo seconds of training work placed here and not yet done (the running task's
        remaining part estimated from its predicted duration)."""
        left = 0.0
        if self._running_since is not None:
            left = max(0.0, self.f + self.b - (self.live.now - self._running_since))
        return left + len(self.queue) * (self.f + self.b)

    def _ready(self) -> bool:
        return bool(self.queue) and (self.gate is None or self.gate(self.gpu, self.activation_bytes))

    def _train(self) -> None:
        live = self.live
        while True:
            with self._cond:
                while not live.stopped and not self._ready():
                    # the memory gate opens as serving frees KV blocks, which nobody signals: poll it
                    self._cond.wait(0.005 if self.queue else None)
                if live.stopped:
                    return
                task = self.queue.popleft()
                task.start_s = self._running_since = live.now
                self.busy = True
                alone, iterations_before = self.instance.running_kind is None, self.instance.iterations
                self.pool.allocate("train_activations", self.activation_bytes)
            self.worker.step(self.index, [task], False)
            with self._cond:
                end = live.now
                self.train_busy_s += end - task.start_s
                if alone and self.instance.running_kind is None and self.instance.iterations == iterations_before:
                    self.solo_s[0] += end - task.start_s
                    self.solo_s[1] += self.predicted_s[0] + self.predicted_s[1]
                self.pool.release("train_activations", self.activation_bytes)
                self._running_since = None
                self.busy = step_due = (self.tasks_done + 1) % self.global_batch == 0
                task.finish_s = end
                self.tasks_done += 1
                self.on_task_done(task)
            if step_due:
                start = live.now
                self.worker.step(self.index, [], True)
                with self._cond:
                    end = live.now
                    self.busy = False
                    self.train_busy_s += end - start
                    self.version += 1
                    self.instance.model_version = self.version
                    self.on_step(self.index, self.version, math.nan, end, self.global_batch,
                                 self.global_batch * task.tokens)


class SyncTrainer(LiveTrainer):
    """Isolated training on its own GPU (one stage, one replica) with weight syncs to serving."""

    def __init__(self, *args, serving: list, sync_every: int, **kw):
        super().__init__(*args, **kw)
        self.serving = serving            # the serving LiveInstances
        self.sync_every = sync_every
        self.syncs = 0
        self.sync_s: list[float] = []

    def _train(self) -> None:
        live = self.live
        while True:
            with self._cond:
                while not live.stopped and len(self.queue) < self.global_batch:
                    self._cond.wait()
                if live.stopped:
                    return
                tasks = [self.queue.popleft() for _ in range(self.global_batch)]
                start = live.now
                for t in tasks:
                    t.start_s = start
            self.worker.step(self.index, tasks, True)
            with self._cond:
                end = live.now
                self.train_busy_s += end - start
                f, b, opt = self.predicted_s
                self.solo_s[0] += end - start              # its own GPU: always alone
                self.solo_s[1] += len(tasks) * (f + b) + opt
                self.version += 1
                for t in tasks:
                    t.finish_s = end
                    self.tasks_done += 1
                    self.on_task_done(t)
                self.on_step(self.index, self.version, start, end, len(tasks), sum(t.tokens for t in tasks))
                sync = self.version % self.sync_every == 0
            if sync:
                self._sync(self.version)

    def _sync(self, version: int) -> None:
        """Copy the trained weights into every serving replica (serving keeps running meanwhile, as in
        the simulator's weight sync); the replicas serve ``version`` from the copy's end."""
        start = self.live.now
        self.worker.sync()
        with self._cond:
            for inst in self.serving:
                inst.model_version = version
            self.syncs += 1
            self.sync_s.append(self.live.now - start)
