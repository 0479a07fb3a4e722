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

While the node's training is a closed loop (no node serves anything: see ``training.node_cycles``), the
pipeline watches for a cycle: when the state after a task equals the state ``global_batch`` tasks earlier
(or a point of a cycle it measured before), it advances in closed form (``Cycles``) to the point of the
cycle nearest before the next request's arrival, and resumes event by event from there.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Protocol

import numpy as np

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask
from simcolo.training.node_cycles import Cycles, CycleState, Layout, Period
from simcolo.training.pipeline_rules import GATED, PipelineRules

KERNEL_KINDS = {"F": "train_forward", "B": "train_backward", "O": "optimizer"}
KNOWN_PERIODS = 8   # periods a pipeline remembers, to come back to after a request


class CycleHost(Protocol):
    """What the backend tells a pipeline about the rest of the run, for advancing idle cycles."""

    def closed_loops(self) -> bool:
        """Every node's training is a closed loop now (see ``TrainingPlacement.serving_nothing``)."""

    def horizon_s(self) -> float:
        """The earliest time something from outside can reach a node (the next request; the run's end)."""

    def credit_cycles(self, pipe: "NodePipeline", cycles: Cycles, tasks: int, first_version: int) -> None:
        """Count what ``cycles`` did outside the pipeline: ``tasks`` finished and replaced on the node, its
        versions (``first_version`` and on, ending at ``cycles.step_ends()``)."""


class NodePipeline:
    """One co-located node's training pipeline on the simulator's clock (see the module docstring).
    ``host``: where idle cycles are advanced in closed form (None: never, event by event)."""

    def __init__(self, env: SimEnvironment, index: int, gpus: list, forward_s: list[float], backward_s: list[float],
                 optimizer_s: list[float], activation_bytes: list[float], link_s: float, global_batch: int,
                 release: str, max_inflight: int, on_task_done: Callable[[TrainTask], None],
                 on_version: Callable[["NodePipeline"], None],
                 gate: Callable[[int, float], bool] | None = None, gate_poll_s: float = 0.005,
                 host: CycleHost | None = None):
        self.rules = PipelineRules(index, [g.index for g in gpus], [g.memory for g in gpus], forward_s, backward_s,
                                   optimizer_s, activation_bytes, global_batch, release, max_inflight, gate)
        self.env, self.index, self.gpus, self.S = env, index, gpus, self.rules.S
        self.link_s, self.gate_poll_s = link_s, gate_poll_s
        self.on_task_done, self.on_version = on_task_done, on_version
        # (op, Kernel, task or None) running on each stage
        self.running: list[tuple[str, object, TrainTask | None] | None] = [None] * self.S
        self._polling = [False] * self.S
        self._links: dict[At, tuple[str, int, TrainTask, float]] = {}   # transfers in flight: (F|B, to stage, task, at)
        self.host = host
        self.cycling: Cycles | None = None
        self.cycles_advanced = 0       # periods advanced in closed form
        self.advances_to_a_point = 0   # advances that ended at another point of the period than they began
        if host is not None:
            n = global_batch + 1
            self._states: deque[CycleState] = deque(maxlen=global_batch)   # after each task, while a loop
            self._ops = [deque(maxlen=8 * n) for _ in range(self.S)]       # (op, start, end) of ended ops
            self._version_times: deque[float] = deque(maxlen=2 * n)
            self._parked: list = []    # (stage, op, task, work left, started) of kernels held while cycling
            self._parked_links: list = []  # (F|B, to stage, task, seconds left) of transfers held
            self._shown = [0.0] * self.S   # activations moved on the pools for a sample inside cycles
            # the last periods measured (a request may leave the loop on another cycle: a node's number of
            # tasks changes as the policy places them), and their points by shape: (period, phase, point)
            self._known: deque[Period] = deque(maxlen=KNOWN_PERIODS)
            self._known_points: dict[tuple, list[tuple[Period, float, CycleState]]] = {}
            self._order: deque[TrainTask] = deque()   # the tasks on the node, oldest first (a Layout's ranks)
            for s, g in enumerate(gpus):
                g.compute.offline = (lambda now, s=s: 0.0 if self.cycling is None else self.cycling.busy_s(s, now))

    @property
    def version(self) -> int:
        return self.rules.version

    # ------------------------------------------------------------------ intake
    def place(self, task: TrainTask) -> None:
        if self.cycling is not None:
            raise RuntimeError(f"node {self.index}: a task placed at {self.env.now} inside cycles advanced to "
                               f"{self.cycling.end_s}")
        self.rules.place(task)
        if self.host is not None:
            self._order.append(task)
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
            self.running[s] = (op, kernel, task)

    def _poll(self, s: int) -> None:
        if not self._polling[s]:
            self._polling[s] = True
            At(self.env, self.env.now + self.gate_poll_s).callbacks.append(lambda _ev, s=s: self._unpoll(s))

    def _unpoll(self, s: int) -> None:
        self._polling[s] = False
        self._kick(s)

    def _done(self, s: int, op: str, task) -> None:
        rules = self.rules
        kernel = self.running[s][1]
        self.running[s] = None
        now = self.env.now
        rules.stage_busy_s[s] += now - kernel.started_s
        if self.host is not None:
            self._ops[s].append((op, kernel.started_s, now))
        finished = False
        if op == "F":
            if rules.forward_done(s, task):
                self._send("F", s + 1, task)
        elif op == "B":
            if rules.backward_done(s, task):
                self._send("B", s - 1, task)
            else:
                self._task_done(task)
                finished = True
        elif rules.step_done(s):
            if self.host is not None:
                self._version_times.append(now)
            self.on_version(self)
        self._kick(s)
        if s == 0 and rules.release == "async":
            self._release()
        if finished and self.host is not None:
            self._after_task()

    def _send(self, kind: str, s: int, task) -> None:
        """Hand ``task``'s activations (``F``) or gradient (``B``) to stage ``s``, ``link_s`` from now."""
        if self.link_s > 0:
            self._link(kind, s, task, self.env.now + self.link_s)
        else:
            self._arrive(kind, s, task)

    def _link(self, kind: str, s: int, task, at: float) -> None:
        ev = At(self.env, at)
        self._links[ev] = (kind, s, task, at)
        ev.callbacks.append(self._land)

    def _land(self, ev) -> None:
        link = self._links.pop(ev, None)
        if link is not None:   # else parked by cycles advanced in closed form, and re-sent after them
            self._arrive(*link[:3])

    def _arrive(self, kind: str, s: int, task) -> None:
        (self.rules.ready_f if kind == "F" else self.rules.ready_b)[s].append(task)
        self._kick(s)

    def _task_done(self, task: TrainTask) -> None:
        if self.host is not None:
            if self._order[0] is task:
                self._order.popleft()
            else:
                self._order.remove(task)
        self.rules.task_done(task, self.env.now)
        self.on_task_done(task)
        self._release()

    # ------------------------------------------------------------------ idle cycles (training.node_cycles)
    def _after_task(self) -> None:
        """A task just finished: while the training is a closed loop, note the state, and advance in closed
        form when it repeats the state of ``global_batch`` tasks ago, or a point of a cycle measured before
        (the loop came back to it after a request disturbed it)."""
        host, states = self.host, self._states
        if not (host.closed_loops() and self._alone()):
            states.clear()
            return
        horizon = host.horizon_s()
        if states and states[-1].horizon != horizon:
            states.clear()   # a request came (and went) since the last task: the loop was not closed throughout
        state = self._state(horizon)
        if math.isfinite(horizon):
            period, phase = None, 0.0
            if len(states) == states.maxlen and states[0].same_point(state) and state.t > states[0].t:
                period = self._measure(states, state)
            else:
                period, phase = self._known_phase(state)
            if period is not None:
                cycles = self._furthest(state, period, phase, horizon)
                if cycles is not None:
                    states.clear()
                    self._advance(cycles)
                    return
        states.append(state)

    def _furthest(self, state: CycleState, period: Period, phase: float, horizon: float) -> Cycles | None:
        """The advance from ``state`` (``phase`` into ``period``) to the point of the loop nearest before
        ``horizon``: whole periods, then on to one of the period's points; None when no point lies
        between."""
        P, t0 = period.period_s, state.t
        k = math.ceil((horizon - t0) / P) - 1   # whole periods that end before the horizon
        best, best_end = ((k, 0.0, None, False), t0 + k * P) if k >= 1 else (None, -math.inf)
        start = None
        for at, point in period.points:
            if at == phase:
                start = point
                continue
            wrapped = at < phase
            extra = at - phase + (P if wrapped else 0.0)
            m = math.ceil((horizon - t0 - extra) / P) - 1
            end = t0 + m * P + extra   # as ``Cycles.end_s`` reads it
            if m >= 0 and best_end < end < horizon:
                best, best_end = (m, extra, point, wrapped), end
        if best is None:
            return None
        m, extra, point, wrapped = best
        if point is not None and start is None:
            raise RuntimeError(f"node {self.index}: phase {phase} is none of the period's points")
        return Cycles(t0, m, period, phase, extra, start if point is not None else None, point, wrapped)

    def _known_phase(self, state: CycleState) -> tuple[Period | None, float]:
        """The period measured and the phase in it of ``state``, if it is one of its points."""
        for period, phase, point in self._known_points.get(state.shape, ()):
            if point.same_point(state):
                return period, phase
        return None, 0.0

    def _alone(self) -> bool:
        """Nothing but this pipeline on its GPUs, and no forward waiting on the memory gate."""
        return not any(self._polling) and all(not g.compute.residents for g in self.gpus)

    def _state(self, horizon: float) -> CycleState:
        now, rules, g = self.env.now, self.rules, self.rules.global_batch
        layout = self._layout(now)
        shape, times = [], []
        for s, run in enumerate(layout.running):
            shape.append(None if run is None else run[0])
            if run is not None:   # since when, and the work left (a kernel slowed by a request ends later)
                times += [run[1], run[2]]
            # in TB, to the tolerance: what its forwards must fit beside
            times += [layout.activations[s] * 1e-12, self.gpus[s].memory.used * 1e-12]
        links = sorted((kind, s, at - now) for kind, s, _, at in self._links.values()) if self._links else []
        shape += [(kind, s) for kind, s, _ in links]
        times += [at for _, _, at in links]
        steps0 = min(rules.steps_done)
        shape += [len(rules.pending), rules.inflight, rules._stage0_free, rules._active_since is None,
                  tuple(map(len, rules.ready_f)), tuple(map(len, rules.ready_b)), tuple(rules.n_f), tuple(rules.n_b),
                  tuple(b % g for b in rules.backwards_done), tuple(rules.opt_due),
                  tuple(x - steps0 for x in rules.steps_done)]
        computes = [gpu.compute for gpu in self.gpus]
        active = rules.active_s + (0.0 if rules._active_since is None else now - rules._active_since)
        return CycleState(now, tuple(shape), tuple(times),
                          tuple(c.busy_at(now) for c in computes), tuple(c.train_busy_at(now) for c in computes),
                          tuple(rules.stage_busy_s), active, rules.tasks_done, rules.sequences_done, rules.tokens_done,
                          tuple(rules.steps_done), rules.version, tuple(rules.backwards_done), horizon, layout)

    def _layout(self, now: float) -> Layout:
        """Where the tasks are now (see ``Layout``)."""
        rules = self.rules
        rank = {id(task): r for r, task in enumerate(self._order)}
        running = []
        for s in range(self.S):
            run = self.running[s]
            if run is None:
                running.append(None)
                continue
            op, kernel, task = run
            left = self.gpus[s].compute.work_left(kernel, now)
            running.append((op, kernel.started_s - now, left, None if task is None else rank[id(task)]))
        return Layout(len(self._order), tuple(running), tuple(rank[id(t)] for t in rules.pending),
                      tuple(tuple(rank[id(t)] for t in q) for q in rules.ready_f),
                      tuple(tuple(rank[id(t)] for t in q) for q in rules.ready_b),
                      tuple((kind, s, rank[id(task)], at - now) for kind, s, task, at in self._links.values()),
                      rules.inflight, rules._stage0_free,
                      None if rules._active_since is None else rules._active_since - now,
                      tuple(rules.n_f), tuple(rules.n_b), tuple(rules.opt_due),
                      tuple(g.memory.by_use.get("train_activations", 0.0) for g in self.gpus))

    def _measure(self, states, last: CycleState) -> Period:
        """The period from ``states[0]`` to ``last`` (now); remembered, with the states in between as its
        points."""
        first = states[0]
        t0, t1 = first.t, last.t
        spans, acts, held = [], [], []
        for s in range(self.S):
            ops = [(op, a, b) for op, a, b in self._ops[s] if b > t0]
            run = self.running[s]
            if run is not None:
                ops.append((run[0], run[1].started_s, t1))
            spans.append([(max(a, t0) - t0, b - t0) for _, a, b in ops if b > a])
            steps = [(a - t0, self.rules.act[s]) for op, a, _ in ops if op == "F" and a > t0]
            steps += [(b - t0, -self.rules.act[s]) for op, _, b in ops if op == "B" and b <= t1]
            acts.append(sorted(steps))
            held.append(self.gpus[s].memory.by_use.get("train_activations", 0.0)
                        - sum(n for _, n in steps))
        offsets = np.array([v - t0 for v in self._version_times if t0 < v <= t1])
        period = Period(first, last, spans, acts, held, offsets, [(point.t - t0, point) for point in states])
        self._known.append(period)
        self._known_points = {}
        for known in reversed(self._known):   # the latest first
            for at, point in known.points:
                self._known_points.setdefault(point.shape, []).append((known, at, point))
        return period

    def _advance(self, cyc: Cycles) -> None:
        """Advance ``cyc`` from now in closed form: park the kernels and transfers in flight, until it
        ends (:meth:`_resume`)."""
        t1 = cyc.t0
        self.cycling = cyc
        for s in range(self.S):
            run = self.running[s]
            if run is not None:
                op, kernel, task = run
                left = self.gpus[s].compute.cancel(kernel)
                self._parked.append((s, op, task, left, kernel.started_s))
        self._parked_links = [(kind, s, task, at - t1) for kind, s, task, at in self._links.values()]
        self._links.clear()
        At(self.env, cyc.end_s).callbacks.append(lambda _ev: self._resume())

    def _resume(self) -> None:
        """The end of the cycles advanced: credit them, and take up the kernels and transfers parked (the
        advance ended where it started) or the layout of the point it ended at."""
        cyc, rules, now = self.cycling, self.rules, self.env.now
        self.show(None)
        for s, (busy, train) in enumerate(zip(cyc.scaled("busy"), cyc.scaled("train_busy"))):
            c = self.gpus[s].compute
            c.busy_s += busy
            c.train_busy_s += train
        for s, add in enumerate(cyc.scaled("stage_busy")):
            rules.stage_busy_s[s] += add
        for s, add in enumerate(cyc.scaled("steps")):
            rules.steps_done[s] += add
        for s, add in enumerate(cyc.scaled("backwards")):
            rules.backwards_done[s] += add
        tasks = cyc.scaled("tasks")
        rules.tasks_done += tasks
        rules.sequences_done += cyc.scaled("sequences")
        rules.tokens_done += cyc.scaled("tokens")
        first_version = rules.version + 1
        rules.version += cyc.scaled("version")
        self.cycles_advanced += cyc.k
        self.cycling = None
        if cyc.end is None:
            rules.active_s += cyc.scaled("active")
            shift = now - cyc.t0
            if rules._active_since is not None:
                rules._active_since += shift
            parked = [(s, op, task, left, started + shift) for s, op, task, left, started in self._parked]
            links = self._parked_links
        else:
            parked, links = self._take_up(cyc, now)
            self.advances_to_a_point += 1
        self._parked, self._parked_links = [], []
        self.host.credit_cycles(self, cyc, tasks, first_version)
        for s, op, task, left, started in parked:
            kernel = self.gpus[s].compute.resume(KERNEL_KINDS[op], left, now,
                                                 lambda s=s, op=op, task=task: self._done(s, op, task))
            kernel.started_s = started
            self.running[s] = (op, kernel, task)
        for kind, s, task, delay in links:
            self._link(kind, s, task, now + delay)

    def _take_up(self, cyc: Cycles, now: float) -> tuple[list, list]:
        """Put the node's tasks where the tasks of ``cyc.end`` were (by age: tasks are alike, so which
        one stands where does not change what follows) and its counts and activations as they were; the
        kernels (stage, op, task, work left, started) and transfers (F|B, stage, task, in) to take up."""
        rules, lay = self.rules, cyc.end.layout
        tasks = list(self._order)
        if len(tasks) != lay.tasks:
            raise RuntimeError(f"node {self.index}: {len(tasks)} tasks on the node, {lay.tasks} at the point "
                               f"the cycles at {cyc.t0} advanced to")
        total = rules.active_s + (0.0 if rules._active_since is None else cyc.t0 - rules._active_since)
        total += cyc.scaled("active")
        if lay.active_since is None:
            rules.active_s, rules._active_since = total, None
        else:
            rules.active_s, rules._active_since = total + lay.active_since, now + lay.active_since
        rules.pending.clear()
        rules.pending.extend(tasks[r] for r in lay.pending)
        for queues, ranks in ((rules.ready_f, lay.ready_f), (rules.ready_b, lay.ready_b)):
            for q, rs in zip(queues, ranks):
                q.clear()
                q.extend(tasks[r] for r in rs)
        rules.inflight, rules._stage0_free = lay.inflight, lay.stage0_free
        rules.n_f, rules.n_b, rules.opt_due = list(lay.n_f), list(lay.n_b), list(lay.opt_due)
        for s, g in enumerate(self.gpus):
            delta, pool = lay.activations[s] - g.memory.by_use.get("train_activations", 0.0), g.memory
            if delta > 0:
                pool.allocate("train_activations", delta)
            elif delta < 0:
                pool.release("train_activations", -delta)
        for s in range(self.S):
            self.running[s] = None
        kernels = [(s, run[0], None if run[3] is None else tasks[run[3]], run[2], now + run[1])
                   for s, run in enumerate(lay.running) if run is not None]
        return kernels, [(kind, s, tasks[r], at) for kind, s, r, at in lay.links]

    def show(self, now: float | None) -> None:
        """Set the activations held on the pools to what they are at ``now`` inside the cycles being
        advanced (a timeline sample reads them); None: back to the state the cycles park."""
        if self.cycling is None and now is not None:
            return
        for s in range(self.S):
            want = 0.0 if now is None else self.cycling.activations_moved(s, now)
            delta, pool = want - self._shown[s], self.gpus[s].memory
            if delta > 0:
                pool.allocate("train_activations", delta)
            elif delta < 0:
                pool.release("train_activations", -delta)
            self._shown[s] = want

    # ------------------------------------------------------------------ views for policies (pure)
    def stage_backlogs_s(self) -> list[float]:
        """See ``PipelineRules.backlogs_s``."""
        return self.rules.backlogs_s([None if run is None else (run[0], run[1].started_s) for run in self.running],
                                     self.env.now)

    def close(self, now: float) -> None:
        """End of the run: count the time the pipeline is still busy."""
        if self.cycling is not None:   # cycles end before anything that can end the run (horizon_s)
            raise RuntimeError(f"node {self.index}: the run ended at {now} inside cycles advanced to "
                               f"{self.cycling.end_s}")
        self.rules.close(now)

    def report(self) -> TrainerReport:
        report = self.rules.report()
        report.counters["train_periods_in_closed_form"] = self.cycles_advanced
        return report
