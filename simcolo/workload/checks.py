"""Validation shared by the trace loaders.

Every failure is a :class:`TraceError` whose message names the file, the 1-based line, the column and
what was expected, so a user can open the file at that line and see the problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from simcolo.errors import TraceError


def trace_error(path: Path, line: int, column: str, message: str) -> TraceError:
    return TraceError(f"{path}: line {line}, column {column!r}: {message}")


def require_columns(path: Path, found: Sequence[str], required: Sequence[str], hint: str = "") -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise TraceError(
            f"{path}: line 1 (header): missing column(s) {missing}; found columns {list(found)}; "
            f"expected columns {list(required)}" + (f"; {hint}" if hint else "")
        )


def _raw(values: pd.Series, i: int) -> str:
    return repr(values.iloc[i])


def _first_missing(path: Path, values: pd.Series, lines: np.ndarray, column: str) -> None:
    missing = values.isna().to_numpy()
    if missing.any():
        i = int(np.argmax(missing))
        raise trace_error(path, int(lines[i]), column, "empty cell; expected a value")


def token_counts(path: Path, values: pd.Series, lines: np.ndarray, column: str, min_value: int) -> np.ndarray:
    """Parse a token-count column to int64, rejecting empty, non-integer and too-small values."""
    _first_missing(path, values, lines, column)
    if values.dtype.kind == "b":     # a column of True/False
        raise trace_error(path, int(lines[0]), column, f"expected an integer token count, got {_raw(values, 0)}")
    if values.dtype.kind in "iu":
        counts = values.to_numpy(np.int64)
    else:
        # A float column (e.g. a "12.5" cell) or an object column (an "abc" cell). Integral floats
        # such as "12.0" are accepted: they name a whole number of tokens.
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers))
        if bad.any():
            i = int(np.argmax(bad))
            raise trace_error(path, int(lines[i]), column, f"expected an integer token count, got {_raw(values, i)}")
        counts = numbers.astype(np.int64)
    too_small = counts < min_value
    if too_small.any():
        i = int(np.argmax(too_small))
        raise trace_error(path, int(lines[i]), column, f"expected an integer >= {min_value}, got {counts[i]}")
    return counts


def numbers(path: Path, values: pd.Series, lines: np.ndarray, column: str, what: str) -> np.ndarray:
    """Parse a numeric (time) column to float64, rejecting empty, unparsable and infinite values."""
    _first_missing(path, values, lines, column)
    parsed = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(parsed)
    if bad.any():
        i = int(np.argmax(bad))
        raise trace_error(path, int(lines[i]), column, f"expected {what}, got {_raw(values, i)}")
    return parsed


class Timeline:
    """Makes arrival times relative to the file's first row and checks that they never go backwards.

    It keeps the origin and the last row seen, so the order is checked across chunk boundaries too.
    ``per_second`` is the unit of the raw values (1e9 for nanoseconds, 1e3 for milliseconds).
    """

    def __init__(self, path: Path, column: str, per_second: float):
        self.path, self.column, self.per_second = path, column, per_second
        self._origin = None
        self._last = None
        self._last_line = 0

    def relative(self, raw: np.ndarray, lines: np.ndarray) -> np.ndarray:
        if len(raw) == 0:
            return np.empty(0, np.float64)
        if self._origin is None:
            self._origin = self._last = raw[0]
            self._last_line = int(lines[0])
        previous = np.concatenate(([self._last], raw[:-1]))
        backwards = raw < previous
        if backwards.any():
            i = int(np.argmax(backwards))
            prev_line = int(lines[i - 1]) if i > 0 else self._last_line
            raise trace_error(
                self.path, int(lines[i]), self.column,
                f"arrival goes backwards: {self._seconds(raw[i]):.6f} s comes after {self._seconds(previous[i]):.6f} s "
                f"on line {prev_line} (seconds since the first row); expected rows sorted by time",
            )
        self._last, self._last_line = raw[-1], int(lines[-1])
        return (raw - self._origin) / self.per_second

    def _seconds(self, value) -> float:
        return float(value - self._origin) / self.per_second
