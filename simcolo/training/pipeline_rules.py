"""The rules of a co-located node pipeline, written once for both backends.

``simcolo.training.node_pipeline.NodePipeline`` (simulated: SimPy events on the GPUs' shared compute) and
``simcolo.replay.node_pipeline.LiveNodePipeline`` (live: a thread per stage running real kernels) hold a
:class:`PipelineRules` and call it at the same points; each keeps only how it runs an op and hands its
result to the next stage. The rules:

* **Intake.** A placed task waits in ``pending``; every stage owes it a forward and a backward (``n_f``,
  ``n_b``: what ``backlog_s`` predicts from).
* **Release** (a pending task enters stage 0): ``async`` (LeMix) when the previous task has finished its
  stage-0 forward, ``sync`` when it has finished its backward (one task in the pipeline at a time); either
  way at most ``max_inflight`` tasks are in the pipeline.
* **A stage's next op:** an optimizer step owed (one every ``global_batch`` backwards of that stage), then
  a ready backward, then a ready forward (1F1B order; it is also the "blocking by earlier backward
  passes" LeMix predicts) if the stage's memory pool fits its activations and the policy's memory gate
  is open. The forward holds those bytes (``train_activations``) until its backward.
* **Version:** the number of optimizer steps every stage has taken (the minimum over stages).

Nothing here reads a clock: the times it records (a task's start and finish, the time with a task in the
pipeline) are the ``now`` its caller passes.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from simcolo.errors import ConfigError
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask

RELEASES = ("async", "sync")
GATED = "gated"   # ``next_op``: a forward is ready but memory or the gate holds it (re-check later)


class PipelineRules:
    """Queues, counts and accounting of one node's pipeline of S stages. ``pools[s]`` is stage ``s``'s
    GPU ``MemoryPool`` (None: not tracked), ``gpus[s]`` the GPU index the ``gate(gpu, nbytes)`` is asked
    about. Per-stage seconds (``forward_s``...) are solo predictions."""

    def __init__(self, index: int, gpus: list[int], pools: list, forward_s: list[float], backward_s: list[float],
                 optimizer_s: list[float], activation_bytes: list[float], global_batch: int, release: str,
                 max_inflight: int, gate: Callable[[int, float], bool] | None = None):
        if release not in RELEASES:
            raise ConfigError(f"training release '{release}' is unknown; expected one of {RELEASES}")
        S = len(gpus)
        for what, xs in (("pools", pools), ("forward_s", forward_s), ("backward_s", backward_s),
                         ("optimizer_s", optimizer_s), ("activation_bytes", activation_bytes)):
            if len(xs) != S:
                raise ValueError(f"node {index}: {S} stages but {len(xs)} {what}")
        if S < 1 or global_batch < 1 or max_inflight < 1:
            raise ValueError(f"node {index}: stages={S}, global_batch={global_batch}, max_inflight={max_inflight} "
                             f"must all be >= 1")
        self.index, self.S, self.gpus, self.pools, self.gate = index, S, list(gpus), list(pools), gate
        self.f, self.b, self.opt = list(forward_s), list(backward_s), list(optimizer_s)
        self.act = list(activation_bytes)
        self.global_batch, self.release, self.max_inflight = global_batch, release, max_inflight

        self.pending: deque[TrainTask] = deque()   # placed, not yet released
        self.inflight = 0
        self.inflight_peak = 0
        self._stage0_free = True                   # the last released task finished its stage-0 forward
        self.ready_f: list[deque] = [deque() for _ in range(S)]
        self.ready_b: list[deque] = [deque() for _ in range(S)]
        self.n_f = [0] * S                         # forwards / backwards stage s still owes placed tasks
        self.n_b = [0] * S
        self.backwards_done = [0] * S
        self.opt_due = [0] * S                     # optimizer steps owed by each stage
        self.steps_done = [0] * S
        self.version = 0
        self.stage_busy_s = [0.0] * S              # seconds each stage ran ops (added by the pipeline)
        self.active_s = 0.0                        # time with a task in the pipeline, up to _active_since
        self._active_since: float | None = None    # set while a task is in the pipeline
        self.sequences_done = 0
        self.tokens_done = 0
        self.tasks_done = 0

    # ------------------------------------------------------------------ intake and release
    def place(self, task: TrainTask) -> None:
        """Queue ``task`` here (the caller then releases what it may)."""
        task.node = self.index
        self.pending.append(task)
        for s in range(self.S):
            self.n_f[s] += 1
            self.n_b[s] += 1

    def release_next(self, now: float) -> bool:
        """Release the next pending task into stage 0's ready forwards if the release rule lets it enter
        now; False when none may. The caller wakes stage 0 after each and calls again."""
        if not self.pending or self.inflight >= self.max_inflight:
            return False
        if (self.release == "sync" and self.inflight) or (self.release == "async" and not self._stage0_free):
            return False
        task = self.pending.popleft()
        task.start_s = now
        if self.inflight == 0:
            self._active_since = now
        self.inflight += 1
        self.inflight_peak = max(self.inflight_peak, self.inflight)
        self._stage0_free = False
        self.ready_f[0].append(task)
        return True

    # ------------------------------------------------------------------ a stage's ops
    def next_op(self, s: int) -> tuple[str | None, TrainTask | None]:
        """The op idle stage ``s`` runs next, taken off its queue: ``("O", None)``, ``("B", task)`` or
        ``("F", task)`` (its activations then allocated); ``(GATED, None)`` when only a forward is ready and
        memory or the gate holds it (nobody signals when that changes: re-check it); ``(None, None)``."""
        if self.opt_due[s]:
            return "O", None
        if self.ready_b[s]:
            return "B", self.ready_b[s].popleft()
        if self.ready_f[s]:
            nbytes, pool = self.act[s], self.pools[s]
            if (pool is not None and not pool.fits(nbytes)) or \
                    (self.gate is not None and not self.gate(self.gpus[s], nbytes)):
                return GATED, None
            task = self.ready_f[s].popleft()
            if pool is not None:
                pool.allocate("train_activations", nbytes)
            return "F", task
        return None, None

    def solo_s(self, s: int, op: str) -> float:
        """Predicted solo seconds of ``op`` on stage ``s``."""
        return self.f[s] if op == "F" else self.b[s] if op == "B" else self.opt[s]

    def forward_done(self, s: int, task: TrainTask) -> bool:
        """Stage ``s`` finished ``task``'s forward. True: its activations go on to stage s+1 (the caller
        hands them over, then appends the task to ``ready_f[s + 1]``); False (last stage): its backward is
        ready here."""
        self.n_f[s] -= 1
        if s == 0:
            self._stage0_free = True
        if s + 1 < self.S:
            return True
        self.ready_b[s].append(task)
        return False

    def backward_done(self, s: int, task: TrainTask) -> bool:
        """Stage ``s`` finished ``task``'s backward: its activations are freed and, every ``global_batch``
        backwards, an optimizer step is owed. True: the gradient goes on to stage s-1 (the caller appends
        the task to ``ready_b[s - 1]``); False (stage 0): the task is done (call :meth:`task_done`)."""
        self.n_b[s] -= 1
        if self.pools[s] is not None:
            self.pools[s].release("train_activations", self.act[s])
        self.backwards_done[s] += 1
        if self.backwards_done[s] % self.global_batch == 0:
            self.opt_due[s] += 1
        return s > 0

    def step_done(self, s: int) -> bool:
        """Stage ``s`` took an optimizer step; True when that raised the model version."""
        self.opt_due[s] -= 1
        self.steps_done[s] += 1
        v = min(self.steps_done)
        if v > self.version:
            self.version = v
            return True
        return False

    def task_done(self, task: TrainTask, now: float) -> None:
        """``task`` finished its stage-0 backward at ``now`` (the caller then reports it and releases)."""
        task.finish_s = now
        self.inflight -= 1
        if self.inflight == 0:
            self.active_s += now - self._active_since
            self._active_since = None
        self.sequences_done += task.micro_batch
        self.tokens_done += task.tokens
        self.tasks_done += 1

    # ------------------------------------------------------------------ views
    @property
    def queued(self) -> int:
        return len(self.pending) + self.inflight

    def backlogs_s(self, running: list[tuple[str, float] | None], now: float) -> list[float]:
        """Solo seconds of training work each stage still has to do for tasks placed here: the forwards
        and backwards not yet run (earlier tasks' backwards included) and what is left of the op it is
        running (``running[s]``: the op and when it started, or None; the op is counted in ``n_f``/``n_b``
        until it finishes).

        What is left of the running op is its prediction less the time it has run, in both backends: a
        deployment knows when a kernel started, not how far it has got, so the simulator does not tell a
        policy the kernel's true progress either. One call for all stages: LeMix and Tidal ask for every
        node's at each placement."""
        out = []
        for s, run in enumerate(running):
            n_f, n_b, left = self.n_f[s], self.n_b[s], 0.0
            if run is not None:
                op, since = run
                n_f -= op == "F"
                n_b -= op == "B"
                left = max(0.0, self.solo_s(s, op) - (now - since))
            out.append(left + n_f * self.f[s] + n_b * self.b[s])
        return out

    def close(self, now: float) -> None:
        """Count the time a task is in the pipeline up to ``now`` into ``active_s``."""
        if self._active_since is not None:
            self.active_s += now - self._active_since
            self._active_since = now

    def report(self, now: float | None = None) -> TrainerReport:
        """Span: S x the time with a task in the pipeline (up to ``now`` where given, else up to the
        last :meth:`close`)."""
        active = self.active_s
        if now is not None and self._active_since is not None:
            active += now - self._active_since
        return TrainerReport(self.sequences_done, self.tokens_done, sum(self.stage_busy_s), self.S * active,
                             {"train_queued_tasks": self.queued})
