"""Idle cycles of a co-located node's pipeline: what lets the simulator skip them.

While no node serves anything, a backlog task that finishes on a node is replaced on that node and no
deferred task is offered again (``colocation.nodes.TrainingPlacement``), so each node's pipeline is a
closed loop: nothing outside it changes what it does, its kernels run alone on its GPUs at one rate, and an optimizer step
follows every ``global_batch`` backwards. Such a loop settles into a cycle of ``global_batch`` tasks that
repeats exactly, shifted in time.

:class:`CycleState` is what the pipeline looks like the moment a task finishes, with every time taken
relative to that moment (the kernel each stage runs and since when, the queues, the counts modulo the
optimizer's period, the transfers in flight), and the running totals a cycle adds to. When the state
after a task equals the state ``global_batch`` tasks earlier, the span in between is a :class:`Period` ``P``
of the loop, and the next ``k`` periods are known: the same totals added ``k`` times, the same optimizer
steps ``P`` later each time. The same holds from any state after a task inside a period measured before
(the loop came back to it after a request), read from that point on.

Each state keeps a :class:`Layout`: where every task on the node is (by its age among them), what each
stage runs and since when, the transfers in flight. An advance may so end at any point of the period,
not only where it started: ``k`` periods and then the part of one up to the point nearest before the
next request. :class:`Cycles` holds such an advance: its busy clocks and held activations can be read at
any instant inside it (a timeline sample), and ``NodePipeline`` credits it when it ends and takes up
there either the kernels and transfers it parked (it ended where it started, ``k * P`` later) or the
layout of the point it ended at, with its own tasks in the places of that point's.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import numpy as np

#: two relative times (seconds) count as equal within this; a period repeats to float rounding
TIME_TOL_S = 1e-9


@dataclass(frozen=True)
class Layout:
    """Where a node pipeline's tasks are right after a task finished, each task named by its *rank*: its
    age among the tasks on the node (0: the one placed first). Times
    are relative to that moment. ``running[s]``: None or (op, started, solo work left, rank or None for
    an optimizer step); ``links``: (F|B, to stage, rank, lands at); ``activations[s]``: the bytes stage
    ``s``'s pool holds for them; ``active_since``: when the pipeline last became busy (None: empty)."""
    tasks: int
    running: tuple
    pending: tuple[int, ...]
    ready_f: tuple[tuple[int, ...], ...]
    ready_b: tuple[tuple[int, ...], ...]
    links: tuple
    inflight: int
    stage0_free: bool
    active_since: float | None
    n_f: tuple[int, ...]
    n_b: tuple[int, ...]
    opt_due: tuple[int, ...]
    activations: tuple[float, ...]


@dataclass
class CycleState:
    """A node pipeline right after a task finished at ``t`` (see the module docstring). ``shape`` and
    ``times`` (relative to ``t``) must match for two states to be the same point of a cycle; the rest
    are running totals."""
    t: float
    shape: tuple
    times: tuple[float, ...]
    busy: tuple[float, ...]        # per stage GPU: busy seconds up to t
    train_busy: tuple[float, ...]  # per stage GPU: training-busy seconds up to t
    stage_busy: tuple[float, ...]  # per stage: seconds of ops ended by t
    active: float                  # time with a task in the pipeline up to t
    tasks: int
    sequences: int
    tokens: int
    steps: tuple[int, ...]
    version: int
    backwards: tuple[int, ...] = ()   # per stage: backwards done up to t
    horizon: float = math.inf         # the next request's arrival, as known at t
    layout: Layout | None = None

    def same_point(self, other: "CycleState") -> bool:
        if self.shape != other.shape or len(self.times) != len(other.times):
            return False
        return all(abs(a - b) <= TIME_TOL_S for a, b in zip(self.times, other.times))


class Period:
    """One period of a closed loop, measured from ``first`` to ``last`` (states a period apart).
    ``busy_spans[s]``: stage ``s``'s kernels in it, as (start, end) relative to its start, in order;
    ``act_steps[s]``: (time relative to its start, bytes) for each allocation (+) or release (-) of
    activations on stage ``s``, from ``act_at_start[s]`` bytes held; ``version_offsets``: the version
    steps made in it, relative to its start, in (0, ``period_s``]; ``points``: (time from its start, state)
    after each of its tasks, ``first`` the first of them."""

    def __init__(self, first: CycleState, last: CycleState, busy_spans: list[list[tuple[float, float]]],
                 act_steps: list[list[tuple[float, float]]], act_at_start: list[float], version_offsets: np.ndarray,
                 points: list[tuple[float, CycleState]] = ()):
        self.first, self.last, self.points = first, last, list(points)
        self.period_s = last.t - first.t
        self.busy_spans, self.act_steps, self.act_at_start = busy_spans, act_steps, act_at_start
        self.version_offsets = version_offsets
        # prefix sums, for reading a stage's busy time and activations at any point in O(log n)
        self._starts = [[a for a, _ in spans] for spans in busy_spans]
        self._busy_before = [list(itertools.accumulate((b - a for a, b in spans), initial=0.0)) for spans in busy_spans]
        self._step_at = [[at for at, _ in steps] for steps in act_steps]
        self._held = [list(itertools.accumulate((n for _, n in steps), initial=held))
                      for steps, held in zip(act_steps, act_at_start)]

    def busy_until(self, s: int, y: float) -> float:
        """Stage ``s``'s GPU busy seconds from the period's start to ``y`` later (``y`` may span periods)."""
        j = math.floor(y / self.period_s)
        phase = y - j * self.period_s
        busy = j * (self.last.busy[s] - self.first.busy[s])
        i = bisect.bisect_left(self._starts[s], phase)   # spans that started before ``phase``
        if i:
            a, b = self.busy_spans[s][i - 1]
            busy += self._busy_before[s][i - 1] + min(b, phase) - a
        return busy

    def held_at(self, s: int, y: float) -> float:
        """Bytes of activations stage ``s`` holds ``y`` after the period's start (``y`` may span periods)."""
        phase = y - math.floor(y / self.period_s) * self.period_s
        return self._held[s][bisect.bisect_right(self._step_at[s], phase)]


@dataclass
class Cycles:
    """An advance in closed form from ``t0`` (a task's end, the loop at point ``start``, ``phase_s`` into
    the measured :class:`Period`): ``k`` whole periods, then ``extra_s`` more up to the point ``end``
    (None: none, the advance ends where it started). ``wrapped``: ``end`` lies before ``start`` in the
    period, so the part after the ``k`` periods crosses the period's start."""
    t0: float
    k: int
    period: Period
    phase_s: float = 0.0
    extra_s: float = 0.0
    start: CycleState | None = None
    end: CycleState | None = None
    wrapped: bool = False

    def __post_init__(self):
        # what the period reads at ``t0`` (every busy-time and activations read subtracts it)
        p, stages = self.period, range(len(self.period.busy_spans))
        self._busy0 = [p.busy_until(s, self.phase_s) for s in stages]
        self._held0 = [p.held_at(s, self.phase_s) for s in stages]

    @property
    def period_s(self) -> float:
        return self.period.period_s

    @property
    def end_s(self) -> float:
        return self.t0 + self.k * self.period_s + self.extra_s

    def _into(self, now: float) -> float:
        """Time from the measured period's start to ``now``, the advance clipped to its span."""
        return self.phase_s + min(max(now - self.t0, 0.0), self.k * self.period_s + self.extra_s)

    def busy_s(self, s: int, now: float) -> float:
        """Stage ``s``'s GPU busy seconds from ``t0`` to ``now`` (not yet on its clock)."""
        return self.period.busy_until(s, self._into(now)) - self._busy0[s]

    def activations_moved(self, s: int, now: float) -> float:
        """Bytes of activations stage ``s`` holds at ``now`` beyond what it held at ``t0``."""
        return self.period.held_at(s, self._into(now)) - self._held0[s]

    def step_ends(self) -> np.ndarray:
        """End times of the version steps made in the advance, in order."""
        offsets = self.period.version_offsets - self.phase_s
        offsets = np.sort(np.where(offsets > 0, offsets, offsets + self.period_s))
        starts = self.t0 + self.period_s * np.arange(self.k)
        ends = (starts[:, None] + offsets[None, :]).ravel()
        if self.end is None:
            return ends
        tail = offsets[offsets <= self.extra_s]
        return np.concatenate([ends, self.t0 + self.k * self.period_s + tail])

    def scaled(self, field: str) -> list[float] | float | int:
        """What the advance adds to a running total of :class:`CycleState`: ``k`` times the period's
        increase, and from ``start`` to ``end`` where it ends at another point."""
        a, b = getattr(self.period.first, field), getattr(self.period.last, field)
        if self.end is None:
            if isinstance(a, tuple):
                return [self.k * (y - x) for x, y in zip(a, b)]
            return self.k * (b - a)
        turns = self.k + self.wrapped
        x0, x1 = getattr(self.start, field), getattr(self.end, field)
        if isinstance(a, tuple):
            return [turns * (y - x) + (e - s) for x, y, s, e in zip(a, b, x0, x1)]
        return turns * (b - a) + (x1 - x0)
