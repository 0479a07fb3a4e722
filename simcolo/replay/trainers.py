"""Live isolated training: real forward, backward and AdamW steps of the model on the training GPU, in its
own thread (its own CUDA stream) or, on the CPU, a child process (``train_process``).

:class:`LiveIsolatedTrainer` has its own replica on its own GPU; a step = ``global_batch`` tasks + the
optimizer; every ``sync_every`` steps the weights are copied into every serving replica (a real
device-to-device copy) and the replicas serve the new version from then on. (Co-located pipelines are
``replay.node_pipeline``; LoRA finetuning on decode instances is ``replay.finetuner``.)

A task's tokens are random (seeded by the task id): training throughput does not depend on the data.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask


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

    def busy_by_gpu(self) -> dict[int, float]:
        return {self.gpu: self.train_busy_s}

    def close(self) -> None:
        self.worker.close()


class LiveIsolatedTrainer(LiveTrainer):
    """Isolated training on its own GPU (one stage, one replica) with weight syncs to serving: the live
    twin of ``training.sync_trainer.SyncTrainer`` for one replica of one stage."""

    def __init__(self, *args, serving: list, sync_every: int, **kw):
        super().__init__(*args, **kw)
        self.serving = serving            # the serving LiveInstances
        self.sync_every = sync_every
        self.syncs = 0
        self.sync_s: list[float] = []
        self.sequences_done = 0
        self.tokens_done = 0

    def report(self) -> TrainerReport:
        return TrainerReport(self.sequences_done, self.tokens_done,
                             counters={"train_queued_tasks": self.queued, "weight_syncs": self.syncs})

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
                    self.sequences_done += t.micro_batch
                    self.tokens_done += t.tokens
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
