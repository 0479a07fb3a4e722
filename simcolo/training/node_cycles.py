"""Idle cycles of a co-located node's pipeline: what lets the simulator skip them.

While no node serves anything, a backlog task that finishes on a node is replaced on that node and no
deferred task is offered again (``colocation.nodes.TrainingPlacement``), so each node's pipeline is a
closed loop: nothing outside it changes what it does, its kernels run alone on its GPUs at one rate, and an optimizer step
follows every ``global_batch`` backwards. Such a loop settles into a cycle of ``global_batch`` tasks that
repeats exactly, shifted in time.

:class:`CycleState` is what the pipeline looks like the moment a task finishes, with every time taken
relative to that moment (the kernel each stage runs and since when, the queues, the counts modulo the
optimizer's period, the transfers in flight), and the running totals a cycle adds to. When the state
after a task equals the state ``global_batch`` tasks earlier, the cycle in between is a period ``P`` of the
loop, and the next ``k`` periods are known: the same totals added ``k`` times, the same optimizer steps
``P`` later each time. :class:`Cycles` holds such an advance: its busy clocks and held activations can be
read at any instant inside it (a timeline sample), and ``NodePipeline`` credits it and takes up its
kernels and transfers ``k * P`` later when it ends, before the next request arrives.
"""
from __future__ import annotations

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


@dataclass
class Cycles:
    """``k`` periods of ``period_s`` advanced in closed form from ``t0`` (a task's end), measured on one
    period of the loop that ran from ``first`` to ``last``. ``busy_spans[s]``: stage ``s``'s kernels in that
    period, as (start, end) relative to its start; ``act_steps[s]``: (time relative to its start, bytes)
    for each allocation (+) or release (-) of activations on stage ``s``, from ``act_at_start[s]`` bytes
    held. ``phase_s``: where in that period ``t0`` falls (0 when the advance starts where the measured
    period ended; else the loop came back to a point of a cycle measured before, ``phase_s`` into it)."""
    t0: float
    period_s: float
    k: int
    first: CycleState
    last: CycleState
    busy_spans: list[list[tuple[float, float]]]
    act_steps: list[list[tuple[float, float]]]
    act_at_start: list[float]
    version_offsets: np.ndarray    # version steps in the period, relative to its start, in (0, period_s]
    phase_s: float = 0.0

    def __post_init__(self):
        self._busy_before = [self._busy_from_start(s, self.phase_s) for s in range(len(self.busy_spans))]
        self._held_before = [self._held(s, self.phase_s) for s in range(len(self.act_steps))]

    @property
    def end_s(self) -> float:
        return self.t0 + self.k * self.period_s

    def _into(self, now: float) -> float:
        """Time from the measured period's start to ``now``, the advance clipped to its ``k`` periods."""
        return self.phase_s + min(max(now - self.t0, 0.0), self.k * self.period_s)

    def _busy_from_start(self, s: int, y: float) -> float:
        j = math.floor(y / self.period_s)
        phase = y - j * self.period_s
        busy = j * (self.last.busy[s] - self.first.busy[s])
        for a, b in self.busy_spans[s]:
            if a < phase:
                busy += min(b, phase) - a
        return busy

    def busy_s(self, s: int, now: float) -> float:
        """Stage ``s``'s GPU busy seconds from ``t0`` to ``now`` (not yet on its clock)."""
        return self._busy_from_start(s, self._into(now)) - self._busy_before[s]

    def _held(self, s: int, y: float) -> float:
        phase = y - math.floor(y / self.period_s) * self.period_s
        held = self.act_at_start[s]
        for at, nbytes in self.act_steps[s]:
            if at <= phase:
                held += nbytes
        return held

    def activations_moved(self, s: int, now: float) -> float:
        """Bytes of activations stage ``s`` holds at ``now`` beyond what it held at ``t0``."""
        return self._held(s, self._into(now)) - self._held_before[s]

    def step_ends(self) -> np.ndarray:
        """End times of the version steps made in the ``k`` periods, in order."""
        offsets = self.version_offsets - self.phase_s
        offsets = np.sort(np.where(offsets > 0, offsets, offsets + self.period_s))
        starts = self.t0 + self.period_s * np.arange(self.k)
        return (starts[:, None] + offsets[None, :]).ravel()

    def scaled(self, field: str) -> list[float] | float | int:
        """``k`` times the period's increase of a running total of :class:`CycleState`."""
        a, b = getattr(self.first, field), getattr(self.last, field)
        if isinstance(a, tuple):
            return [self.k * (y - x) for x, y in zip(a, b)]
        return self.k * (b - a)
