"""Training on a co-located node: one pipeline replica of S stages on the node's GPUs, fed task by task.

Each *task* (one micro-batch) runs forward through stages 0..S-1 and backward from S-1 to 0. The rules
(release ``async``/``sync``, at most ``max_inflight`` tasks in the pipeline, a stage's next op, activation
memory, optimizer steps every ``global_batch`` backwards, the model version) are
:class:`~simcolo.training.pipeline_rules.PipelineRules`, shared with the live twin
(``simcolo.replay.node_pipeline``). Here a stage runs one training kernel at a time on its GPU's shared
compute, so it co-runs with the node's serving iterations, slowed by interference; activations and
gradients reach the next stage ``link_s`` later; a forward held by memory or the gate (LeMix's memory
threshold) is re-checked every ``gate_poll_s``. When every stage has taken step k, the replica's model
version is k (the co-located serving replica serves it at once).
"""
from __future__ import annotations

from typing import Callable

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask
from simcolo.training.pipeline_rules import GATED, PipelineRules

KERNEL_KINDS = {"F": "train_forward", "B": "train_backward", "O": "optimizer"}


class NodePipeline:
    """One co-located node's training pipeline on the simulator's clock (see the module docstring)."""

    def __init__(self, env: SimEnvironment, index: int, gpus: list, forward_s: list[float], backward_s: list[float],
                 optimizer_s: list[float], activation_bytes: list[float], link_s: float, global_batch: int,
                 release: str, max_inflight: int, on_task_done: Callable[[TrainTask], None],
                 on_version: Callable[["NodePipeline"], None],
                 gate: Callable[[int, float], bool] | None = None, gate_poll_s: float = 0.005):
        self.rules = PipelineRules(index, [g.index for g in gpus], [g.memory for g in gpus], forward_s, backward_s,
                                   optimizer_s, activation_bytes, global_batch, release, max_inflight, gate)
        self.env, self.index, self.gpus, self.S = env, index, gpus, self.rules.S
        self.link_s, self.gate_poll_s = link_s, gate_poll_s
        self.on_task_done, self.on_version = on_task_done, on_version
        self.running: list[tuple[str, object] | None] = [None] * self.S   # (op, Kernel) running on each stage
        self._polling = [False] * self.S

    @property
    def version(self) -> int:
        return self.rules.version

    # ------------------------------------------------------------------ intake
    def place(self, task: TrainTask) -> None:
        self.rules.place(task)
        self._release()

    def _release(self) -> None:
        while self.rules.release_next(self.env.now):
            self._kick(0)

    # ------------------------------------------------------------------ stage execution
    def _kick(self, s: int) -> None:
        if self.running[s] is not None:
            return
        op, task = self.rules.next_op(s)
        if op == GATED:
            self._poll(s)
        elif op is not None:
            kernel = self.gpus[s].compute.start(KERNEL_KINDS[op], self.rules.solo_s(s, op),
                                                lambda: self._done(s, op, task))
            self.running[s] = (op, kernel)

    def _poll(self, s: int) -> None:
        if not self._polling[s]:
            self._polling[s] = True
            At(self.env, self.env.now + self.gate_poll_s).callbacks.append(lambda _ev, s=s: self._unpoll(s))

    def _unpoll(self, s: int) -> None:
        self._polling[s] = False
        self._kick(s)

    def _done(self, s: int, op: str, task) -> None:
        rules = self.rules
        _, kernel = self.running[s]
        self.running[s] = None
        rules.stage_busy_s[s] += self.env.now - kernel.started_s
        if op == "F":
            if rules.forward_done(s, task):
                self._send(lambda: self._arrive(rules.ready_f, s + 1, task))
        elif op == "B":
            if rules.backward_done(s, task):
                self._send(lambda: self._arrive(rules.ready_b, s - 1, task))
            else:
                self._task_done(task)
        elif rules.step_done(s):
            self.on_version(self)
        self._kick(s)
        if s == 0 and rules.release == "async":
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
        self.rules.task_done(task, self.env.now)
        self.on_task_done(task)
        self._release()

    # ------------------------------------------------------------------ views for policies (pure)
    def stage_backlog_s(self, s: int) -> float:
        """See ``PipelineRules.backlog_s``; the running kernel's remaining work is the shared compute's."""
        run = self.running[s]
        if run is None:
            return self.rules.backlog_s(s)
        op, kernel = run
        return self.rules.backlog_s(s, op, kernel.remaining)

    def close(self, now: float) -> None:
        """End of the run: count the time the pipeline is still busy."""
        self.rules.close(now)

    def report(self) -> TrainerReport:
        return self.rules.report()
