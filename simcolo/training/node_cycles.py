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
(the loop came back to it after a request), read from that point on. :class:`Cycles` holds such an
advance: its busy clocks and held activations can be read at any instant inside it (a timeline sample),
and ``NodePipeline`` credits it and takes up its kernels and transfers ``k * P`` later when it ends,
before the next request arrives.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import numpy as np

#: two relative times (seconds) count as equal within this; a period repeats to float rounding
TIME_TOL_S = 1e-9


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

    def same_point(self, other: "CycleState") -> bool:
        if self.shape != other.shape or len(self.times) != len(other.times):
            return False
        return all(abs(a - b) <= TIME_TOL_S for a, b in zip(self.times, other.times))


class Period:
    """One period of a closed loop, measured from ``first`` to ``last`` (states a period apart).
    ``busy_spans[s]``: stage ``s``'s kernels in it, as (start, end) relative to its start, in order;
    ``act_steps[s]``: (time relative to its start, bytes) for each allocation (+) or release (-) of
    activations on stage ``s``, from ``act_at_start[s]`` bytes held; ``version_offsets``: the version
    steps made in it, relative to its start, in (0, ``period_s``]."""

    def __init__(self, first: CycleState, last: CycleState, busy_spans: list[list[tuple[float, float]]],
                 act_steps: list[list[tuple[float, float]]], act_at_start: list[float], version_offsets: np.ndarray):
        self.first, self.last = first, last
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
    """``k`` periods of a measured :class:`Period` advanced in closed form from ``t0`` (a task's end).
    ``phase_s``: where in the measured period ``t0`` falls (0 when the advance starts where it ended;
    else the loop came back to one of its points, ``phase_s`` into it)."""
    t0: float
    k: int
    period: Period
    phase_s: float = 0.0

    @property
    def period_s(self) -> float:
        return self.period.period_s

    @property
    def end_s(self) -> float:
        return self.t0 + self.k * self.period_s

    def _into(self, now: float) -> float:
        """Time from the measured period's start to ``now``, the advance clipped to its ``k`` periods."""
        return self.phase_s + min(max(now - self.t0, 0.0), self.k * self.period_s)

    def busy_s(self, s: int, now: float) -> float:
        """Stage ``s``'s GPU busy seconds from ``t0`` to ``now`` (not yet on its clock)."""
        p = self.period
        return p.busy_until(s, self._into(now)) - p.busy_until(s, self.phase_s)

    def activations_moved(self, s: int, now: float) -> float:
        """Bytes of activations stage ``s`` holds at ``now`` beyond what it held at ``t0``."""
        p = self.period
        return p.held_at(s, self._into(now)) - p.held_at(s, self.phase_s)

    def step_ends(self) -> np.ndarray:
        """End times of the version steps made in the ``k`` periods, in order."""
        offsets = self.period.version_offsets - self.phase_s
        offsets = np.sort(np.where(offsets > 0, offsets, offsets + self.period_s))
        starts = self.t0 + self.period_s * np.arange(self.k)
        return (starts[:, None] + offsets[None, :]).ravel()

    def scaled(self, field: str) -> list[float] | float | int:
        """``k`` times the period's increase of a running total of :class:`CycleState`."""
        a, b = getattr(self.period.first, field), getattr(self.period.last, field)
        if isinstance(a, tuple):
            return [self.k * (y - x) for x, y in zip(a, b)]
        return self.k * (b - a)
