"""Interpolation primitives over a :class:`~simcolo.costs.tables.Grid`, and off-grid bookkeeping.

Conventions shared by every lookup:

* Inside the grid a value is linear in each key between the two neighbouring grid points, and grid
  points return the stored value exactly (the blend is written ``(1 - t) * z0 + t * z1`` or
  ``z0 + (x - x0) * slope``, both exact at ``t = 0`` / ``x = x0``).
* Outside the grid the edge cell is extended linearly (not clamped): a calibration grid that stops at
  batch 256 should not make batch 512 look as cheap as 256. Every such query is counted in
  :class:`OffGrid` and warned about once per table, axis and side.
* An extrapolated value is floored at :data:`MIN_LATENCY_S` so that a steep edge cell can never yield a
  zero or negative duration (which would stall or crash the event loop).
"""
from __future__ import annotations

import warnings
from bisect import bisect_right

import numpy as np

from simcolo.costs.tables import Grid

#: Lower bound of any extrapolated latency: nothing on a GPU takes less than a kernel launch (~µs).
MIN_LATENCY_S = 1e-6


class OffGridWarning(UserWarning):
    """A cost query fell outside the table's grid and was linearly extrapolated."""


def cell(xs: list[float], v: float) -> tuple[int, float]:
    """The cell ``[xs[i], xs[i+1]]`` that serves ``v`` (the edge cell outside the grid) and the weight
    ``t = (v - xs[i]) / (xs[i+1] - xs[i])``, which is < 0 or > 1 when extrapolating."""
    i = bisect_right(xs, v) - 1
    if i < 0:
        i = 0
    elif i > len(xs) - 2:
        i = len(xs) - 2
    x0 = xs[i]
    return i, (v - x0) / (xs[i + 1] - x0)


class OffGrid:
    """Counts queries outside each table's grid, per table and axis, and warns once per side.

    ``counts[table][axis]`` is the number of queries whose ``axis`` value lay outside the grid (a
    vectorized call counts each element).
    """

    def __init__(self, grids: dict[str, Grid], source: str, owner: str = "CostModel"):
        self.counts: dict[str, dict[str, int]] = {
            name: {g.row_axis: 0, g.col_axis: 0} for name, g in grids.items()}
        self._warned: set[tuple[str, str, str]] = set()
        self._source = source
        self._owner = owner

    @classmethod
    def for_axes(cls, axes: dict[str, tuple[str, ...]], source: str, owner: str) -> "OffGrid":
        """Counters for tables that are not single grids (``axes``: table -> its axis names)."""
        off = cls({}, source, owner)
        off.counts = {table: {a: 0 for a in names} for table, names in axes.items()}
        return off

    def note(self, table: str, axis: str, value: float, lo: float, hi: float, n: int = 1,
             stacklevel: int = 3) -> None:
        """Record ``n`` off-grid queries; ``value`` is one of them (for the message). ``stacklevel``
        makes the warning point at the code that called the CostModel."""
        self.counts[table][axis] += n
        side = "below" if value < lo else "above"
        if (table, axis, side) not in self._warned:
            self._warned.add((table, axis, side))
            warnings.warn(
                f"{self._source}: table '{table}', axis '{axis}': query {value:g} is {side} the grid "
                f"range [{lo:g}, {hi:g}]; extrapolating linearly from the edge cell (further "
                f"{side}-range queries on this axis are counted in {self._owner}.off_grid, not warned)",
                OffGridWarning, stacklevel=stacklevel)


class KvRow:
    """Decode latency for one fixed batch size B, as a function of the batch's *total* KV tokens T.

    Stored per cell as ``(a, z0, s)``: ``a = B * x0`` is the cell's left grid point in total tokens
    (exact: both are integers), ``s = slope / B`` the slope per total token. With a virtual cell past the
    last grid point that continues the last real cell's slope, and the search done over ``a[1:]``, the
    cell index is directly the result of ``searchsorted`` -- no clipping -- and every grid point, the
    last included, is hit at ``T == a`` so it returns the stored value exactly.
    ``value = (T - a[i]) * s[i] + z0[i]``: T - a[i] is exact integer arithmetic in float64, so the
    scalar, vectorised and arithmetic-run lookups agree bit for bit.
    """

    __slots__ = ("a", "a_tail", "z0", "s", "a_list", "a_tail_list", "z0_list", "s_list", "batch_off_grid",
                 "lo", "hi")

    def __init__(self, xs: np.ndarray, z: np.ndarray, batch_size: int, batch_off_grid: bool):
        slope = np.diff(z) / np.diff(xs)
        self.a = np.asarray(xs, dtype=np.float64) * batch_size
        self.a_tail = np.ascontiguousarray(self.a[1:])
        self.z0 = np.ascontiguousarray(z, dtype=np.float64)
        self.s = np.append(slope, slope[-1]) / batch_size
        self.a_list: list[float] = self.a.tolist()
        self.a_tail_list: list[float] = self.a_list[1:]
        self.z0_list: list[float] = self.z0.tolist()
        self.s_list: list[float] = self.s.tolist()
        self.lo, self.hi = self.a_list[0], self.a_list[-1]
        self.batch_off_grid = batch_off_grid
