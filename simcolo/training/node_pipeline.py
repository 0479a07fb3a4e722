"""Training on a co-located node: one pipeline replica of S stages on the node's GPUs, fed task by task.

Each *task* (one micro-batch) runs forward through stages 0..S-1 and backward from S-1 to 0. A stage
runs one training kernel at a time on its GPU's shared compute (so it co-runs with the node's serving
iterations, slowed by interference); ready backwards go before ready forwards (1F1B order; it is also
the "blocking by earlier backward passes" LeMix predicts). A forward holds the task's activations in the
stage's GPU memory until its backward. Every ``global_batch`` backwards a stage runs its optimizer step;
when every stage has taken step k, the replica's model version is k (the co-located serving replica
serves it at once).

Release (when the next placed task enters stage 0):

* ``async`` (LeMix): when the previous task has finished its stage-0 forward;
* ``sync``: when the previous task has finished its backward (one task in the pipeline at a time).

Either way at most ``max_inflight`` tasks are in the pipeline (their activation memory is reserved).
A stage's forward may also wait for a *gate* (LeMix's memory threshold), re-checked every
``gate_poll_s``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from simcolo.errors import ConfigError
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask

RELEASES = ("async", "sync")


class NodePipeline:
    def __init__(self, env: SimEnvironment, index: int, gpus: list, forward_s: list[float], backward_s: list[float],
                 optimizer_s: list[float], activation_bytes: list[float], link_s: float, global_batch: int,
                 release: str, max_inflight: int, on_task_done: Callable[[TrainTask], None],
                 on_version: Callable[["NodePipeline"], None],
                 gate: Callable[[int, float], bool] | None = None, gate_poll_s: float = 0.005):
        if release not in RELEASES:
            raise ConfigError(f"training release '{release}' is unknown; expected one of {RELEASES}")
        self.env, self.index, self.gpus = env, index, gpus
        self.S = len(gpus)
        self.f, self.b, self.opt, self.act = forward_s, backward_s, optimizer_s, activation_bytes
        self.link_s, self.global_batch, self.release = link_s, global_batch, release
        self.max_inflight = max_inflight
        self.on_task_done, self.on_version = on_task_done, on_version
        self.gate, self.gate_poll_s = gate, gate_poll_s
        self.pending: deque[TrainTask] = deque()   # placed, not yet released
        self.inflight = 0
        self._stage0_free = True                   # async: the last released task finished its stage-0 F
        self.ready_f: list[deque] = [deque() for _ in range(self.S)]
        self.ready_b: list[deque] = [deque() for _ in range(self.S)]
        self.busy = [False] * self.S
        self.running = [None] * self.S              # the Kernel running on each stage
        self.running_op = [None] * self.S
        self.backwards_done = [0] * self.S
        self.opt_due = [0] * self.S                  # optimizer steps owed by each stage
        self.steps_done = [0] * self.S
        self.version = 0
        self.train_busy_s = [0.0] * self.S
        # work not yet done per stage (forwards and backwards of placed tasks), for predictions
        self.n_f = [0] * self.S
        self.n_b = [0] * self.S
        self._polling = [False] * self.S
        self.active_s = 0.0          # time with at least one task in the pipeline
        self._active_since = None
        self.sequences_done = 0
        self.tokens_done = 0

    # ------------------------------------------------------------------ intake
    def place(self, task: TrainTask) -> None:
        task.node = self.index
        self.pending.append(task)
        for s in range(self.S):
            self.n_f[s] += 1
            self.n_b[s] += 1
        self._release()

    def _release(self) -> None:
        while self.pending and self.inflight < self.max_inflight:
            if self.release == "sync" and self.inflight:
                return
            if self.release == "async" and not self._stage0_free:
                return
            task = self.pending.popleft()
            task.start_s = self.env.now
            if self.inflight == 0:
                self._active_since = self.env.now
            self.inflight += 1
            self._stage0_free = False
            self.ready_f[0].append(task)
            self._kick(0)

    # ------------------------------------------------------------------ stage execution
    def _kick(self, s: int) -> None:
        if self.busy[s]:
            return
        gpu = self.gpus[s]
        if self.opt_due[s]:
            self._start(s, "O", None, "optimizer", self.opt[s])
        elif self.ready_b[s]:
            self._start(s, "B", self.ready_b[s].popleft(), "train_backward", self.b[s])
        elif self.ready_f[s]:
            act = self.act[s]
            if not gpu.memory.fits(act) or (self.gate is not None and not self.gate(gpu.index, act)):
                self._poll(s)
                return
            task = self.ready_f[s].popleft()
            gpu.memory.allocate("train_activations", act)
            self._start(s, "F", task, "train_forward", self.f[s])

    def _poll(self, s: int) -> None:
        if not self._polling[s]:
            self._polling[s] = True
            At(self.env, self.env.now + self.gate_poll_s).callbacks.append(lambda _ev, s=s: self._unpoll(s))

    def _unpoll(self, s: int) -> None:
        self._polling[s] = False
        self._kick(s)

    def _start(self, s: int, op: str, task, kind: str, work: float) -> None:
        self.busy[s] = True
        start = self.env.now
        kernel = self.gpus[s].compute.start(kind, work, lambda: self._done(s, op, task, start))
        self.running[s] = kernel
        self.running_op[s] = op

    def _done(self, s: int, op: str, task, start: float) -> None:
        now = self.env.now
        self.busy[s] = False
        self.running[s] = None
        self.train_busy_s[s] += now - start
        if op == "F":
            self.n_f[s] -= 1
            if s == 0:
                self._stage0_free = True
            if s + 1 < self.S:
                self._send(lambda: self._arrive(self.ready_f, s + 1, task))
            else:
                self.ready_b[s].append(task)
        elif op == "B":
            self.n_b[s] -= 1
            self.gpus[s].memory.release("train_activations", self.act[s])
            self.backwards_done[s] += 1
            if self.backwards_done[s] % self.global_batch == 0:
                self.opt_due[s] += 1
            if s > 0:
                self._send(lambda: self._arrive(self.ready_b, s - 1, task))
            else:
                self._task_done(task)
        else:
            self.opt_due[s] -= 1
            self.steps_done[s] += 1
            v = min(self.steps_done)
            if v > self.version:
                self.version = v
                self.on_version(self)
        self._kick(s)
        if s == 0 and self.release == "async":
            self._release()

    def _send(self, fn) -> None:
        if self.link_s > 0:
            At(self.env, self.env.now + self.link_s).callbacks.append(lambda _ev: fn())
        else:
            fn()

    def _arrive(self, queues, s: int, task) -> None:
        queues[s].append(task)
        self._kick(s)

    def _task_done(self, task: TrainTask) -> None:
        task.finish_s = self.env.now
        self.inflight -= 1
        if self.inflight == 0:
            self.active_s += self.env.now - self._active_since
        self.sequences_done += task.micro_batch
        self.tokens_done += task.tokens
        self.on_task_done(task)
        self._release()

    # ------------------------------------------------------------------ views for policies (pure)
    def stage_backlog_s(self, s: int) -> float:
        """Solo seconds of training work stage ``s`` still has to do for tasks placed here: the
        forwards and backwards not yet run (earlier tasks' backward passes included) and what is left
        of the running kernel."""
        k = self.running[s]
        left = k.remaining if k is not None else 0.0
        op = self.running_op[s] if k is not None else None
        n_f = self.n_f[s] - (op == "F")
        n_b = self.n_b[s] - (op == "B")
        return left + n_f * self.f[s] + n_b * self.b[s]

    def close(self, now: float) -> None:
        """End of the run: count the time the pipeline is still busy."""
        if self.inflight:
            self.active_s += now - self._active_since
            self._active_since = now

    def report(self) -> TrainerReport:
        return TrainerReport(self.sequences_done, self.tokens_done, sum(self.train_busy_s), self.S * self.active_s,
                             {"train_queued_tasks": self.queued})

    @property
    def queued(self) -> int:
        return len(self.pending) + self.inflight
