"""Co-run slowdowns from the ``interference`` table of a cost-table directory (roofline estimate from
``roofline_training.py`` or measured by calibrate/'s ``measure_interference.py``; FORMAT.md).

Lookup rules:

* The table holds rows per serving shape (``a_x``, ``a_y``) and training shape; the simulator asks per
  kind pair, so for each (``kind_a``, ``kind_b``, ``method``, ``sm_share_a``) the **median over the
  shapes** of ``slowdown_a`` and of ``slowdown_b`` is taken (each column on its own).
* ``share_a=None`` (plain CUDA streams, no SM partition): the ``streams`` rows, or the ``threads``
  rows of a CPU calibration (the two sides in two Python threads of one process: the CPU's
  unpartitioned co-run). A kind pair with both is a :class:`TableError` (two devices' measurements
  in one table).
* ``share_a`` a number in (0, 1]: an SM partition giving the serving side that share of the SMs
  (as *asked for*: column ``sm_share_a``, the simulator's knob), measured by the table's *partition
  method*: ``green_context`` (CUDA green contexts) or ``time_share`` (a CPU calibration: the co-runner
  thread paced by the live replay's ``TimeShare`` gate, the CPU analogue of an SM partition). A table
  has at most one of them (rows of both are a :class:`TableError`: two devices' measurements in one
  table). Its medians are linear in ``share_a`` between the measured shares and **clamped** outside
  them (the value at the smallest / largest share measured is used; no extrapolation, which could go
  below 1 or explode).
* Slowdowns below 1 (measurement noise: co-running cannot speed a kernel up) are raised to 1.
* The interference dial (``costs.interference_scale``, :meth:`InterferenceTable.scaled`): a table scaled by
  ``k`` answers ``1 + k (s - 1)`` for each slowdown ``s`` it holds (after the raise to 1): ``k = 1`` is the
  table itself (bit for bit), ``0`` no interference, ``2`` twice the extra time.
* A table without partition rows for the kind pair (calibrated without green contexts, or a kind the
  CPU calibration does not pace) answers a share query with a :class:`TableError` saying it has no
  SM-partition measurements; likewise a kind pair or method the table lacks is a :class:`TableError`
  listing what it has.

Lookups are a dict hit and a bisect over a handful of shares.
"""
from __future__ import annotations

import statistics
from bisect import bisect_right
from pathlib import Path

from simcolo.costs.schema import INTERFERENCE_KINDS_A, INTERFERENCE_KINDS_B, INTERFERENCE_METHODS
from simcolo.costs.tables import _row_label, read_metadata
from simcolo.costs.training_costs import _no_duplicates, choices, numbers, read_reserved_table
from simcolo.errors import TableError

#: Methods of an unpartitioned co-run (all shares 1), answering ``share_a=None``: CUDA streams, or the
#: CPU's two threads (calibrate/measure_interference.py).
UNPARTITIONED = ("streams", "threads")
#: Methods of an SM-partitioned co-run (``sm_share_a`` < 1), answering a share query: CUDA green contexts,
#: or the CPU's time-share gate (calibrate/measure_interference.py). A table has at most one.
PARTITIONED = ("green_context", "time_share")
#: Values of the ``method`` column this reader accepts.
METHODS = tuple(dict.fromkeys((*INTERFERENCE_METHODS, *UNPARTITIONED, *PARTITIONED)))


class _Pair:
    """Precomputed slowdowns of one (kind_a, kind_b): unpartitioned (streams or threads) medians and the
    partition method's medians by share."""

    __slots__ = ("streams", "shares", "sd_a", "sd_b")

    def __init__(self, streams: tuple[float, float] | None, shares: list[float], sd_a: list[float],
                 sd_b: list[float]):
        self.streams, self.shares, self.sd_a, self.sd_b = streams, shares, sd_a, sd_b

    def partition(self, share: float) -> tuple[float, float]:
        xs = self.shares
        if share <= xs[0]:
            return self.sd_a[0], self.sd_b[0]
        if share >= xs[-1]:
            return self.sd_a[-1], self.sd_b[-1]
        i = bisect_right(xs, share) - 1
        x0 = xs[i]
        t = (share - x0) / (xs[i + 1] - x0)
        a, b = self.sd_a, self.sd_b
        return (1.0 - t) * a[i] + t * a[i + 1], (1.0 - t) * b[i] + t * b[i + 1]


class InterferenceTable:
    """Slowdown of a serving kernel (``prefill``/``decode``) and of a training kernel
    (``train``/``lora``) co-running on one GPU (lookup rules: module docstring).

    ``method`` is the metadata's ``interference_method`` (``green_context``, ``streams``, ``threads``, ...),
    ``'roofline'`` when the metadata has none (roofline directories), ``'none'`` for :meth:`none`.
    ``partition_method`` is the method of the rows that answer share queries (``green_context`` or
    ``time_share``), None when the table has none.
    """

    def __init__(self, directory: Path | None, metadata: dict, method: str, pairs: dict[tuple[str, str], _Pair],
                 partition_method: str | None = None, scale: float = 1.0):
        self.directory = None if directory is None else Path(directory)
        self.metadata = metadata
        self.method = method
        self.partition_method = partition_method
        self.scale = float(scale)
        self._pairs = pairs
        self._none = directory is None

    def scaled(self, scale: float) -> "InterferenceTable":
        """This table with every co-run slowdown ``s`` answered as ``1 + scale * (s - 1)`` (the interference
        dial, ``costs.interference_scale``); ``scale`` 1 returns the table itself."""
        if not (scale >= 0.0) or scale != scale or scale == float("inf"):
            raise ValueError(f"interference scale {scale!r}; expected a finite number >= 0")
        if scale == self.scale:
            return self
        return InterferenceTable(self.directory, self.metadata, self.method, self._pairs, self.partition_method,
                                 scale)

    @classmethod
    def load(cls, directory: str | Path) -> "InterferenceTable":
        """Read the ``interference`` table of a cost-table directory; :class:`TableError` if it is
        missing or malformed."""
        directory = Path(directory)
        meta = read_metadata(directory)
        method = meta.get("interference_method", "roofline")
        hint = (f"; the metadata says interference_method: {method!r} (simulate without co-run slowdowns with "
                f"costs.interference=none)" if "interference_method" in meta else
                "; roofline directories get it from `python -m simcolo.costs.roofline` (generator v3 or "
                "later), calibrate/ measures it on a CUDA device")
        path, df = read_reserved_table(directory, meta, "interference", hint)
        kind_a = choices(df, "kind_a", path, INTERFERENCE_KINDS_A)
        kind_b = choices(df, "kind_b", path, INTERFERENCE_KINDS_B)
        methods = choices(df, "method", path, METHODS)
        pos = {"integer": True, "minimum": 1, "expected": "a positive integer"}
        a_x, a_y = numbers(df, "a_x", path, **pos), numbers(df, "a_y", path, **pos)
        b_mb, b_seq = numbers(df, "b_micro_batch", path, **pos), numbers(df, "b_seq_len", path, **pos)
        share = {"minimum": 0, "strict": True, "maximum": 1, "expected": "an SM share in (0, 1]"}
        share_a = numbers(df, "sm_share_a", path, **share)
        numbers(df, "sm_share_a_actual", path, **share)
        numbers(df, "sm_share_b", path, **share)
        latency = {"minimum": 0, "strict": True, "expected": "a latency > 0 seconds"}
        for col in ("latency_a_alone_s", "latency_b_alone_s", "latency_a_s", "latency_b_s"):
            numbers(df, col, path, **latency)
        ratio = {"minimum": 0, "strict": True, "expected": "a slowdown > 0"}
        sd_a, sd_b = numbers(df, "slowdown_a", path, **ratio), numbers(df, "slowdown_b", path, **ratio)
        numbers(df, "repeats", path, minimum=0, expected="a value >= 0")
        for i, (m, s) in enumerate(zip(methods, share_a)):
            if m in UNPARTITIONED and s != 1.0:
                raise TableError(f"{path}: {_row_label(path, i)}, column 'sm_share_a': {s!r}; expected 1 for "
                                 f"method {m!r} (no SM partition)")
            if m in PARTITIONED and s >= 1.0:
                raise TableError(f"{path}: {_row_label(path, i)}, column 'sm_share_a': {s!r}; expected a share "
                                 f"< 1 for method {m!r} (side b needs SMs too)")
        partitioned = [m for m in PARTITIONED if m in set(methods)]
        if len(partitioned) > 1:
            raise TableError(f"{path}: has rows of partition methods {partitioned}; an SM partition is measured one "
                             "way (CUDA green contexts or the CPU's time share), not both")
        part = partitioned[0] if partitioned else None
        keys = list(zip(kind_a, a_x, a_y, kind_b, b_mb, b_seq, methods, share_a))
        _no_duplicates(keys, ("kind_a", "a_x", "a_y", "kind_b", "b_micro_batch", "b_seq_len", "method",
                              "sm_share_a"), path)
        groups: dict[tuple, tuple[list[float], list[float]]] = {}
        for i, (ka, kb, m, s) in enumerate(zip(kind_a, kind_b, methods, share_a)):
            ga, gb = groups.setdefault((ka, kb, m, s), ([], []))
            ga.append(sd_a[i])
            gb.append(sd_b[i])
        med = {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in groups.items()}
        pairs = {}
        for ka, kb in sorted({(k[0], k[1]) for k in med}):
            found = [m for m in UNPARTITIONED if (ka, kb, m, 1.0) in med]
            if len(found) > 1:
                raise TableError(f"{path}: kind_a={ka!r}, kind_b={kb!r} has rows of methods {found}; an "
                                 "unpartitioned co-run is measured one way (CUDA streams or CPU threads), not both")
            streams = med[(ka, kb, found[0], 1.0)] if found else None
            shares = sorted(k[3] for k in med if k[:3] == (ka, kb, part))
            pairs[(ka, kb)] = _Pair(streams, shares, [med[(ka, kb, part, s)][0] for s in shares],
                                    [med[(ka, kb, part, s)][1] for s in shares])
        return cls(directory, meta, str(method), pairs, part)

    @classmethod
    def none(cls) -> "InterferenceTable":
        """No interference at all: every slowdown is 1 (tests, serving-only what-ifs)."""
        return cls(None, {}, "none", {})

    def slowdown(self, kind_a: str, kind_b: str, share_a: float | None) -> tuple[float, float]:
        """(slowdown of the serving kernel ``kind_a``, slowdown of the training kernel ``kind_b``),
        both >= 1, when they co-run with plain streams or, on the CPU, in two threads (``share_a`` None)
        or with ``share_a`` of the SMs given to the serving side (on the CPU: of the time, ``time_share``)."""
        if kind_a not in INTERFERENCE_KINDS_A:
            raise ValueError(f"kind_a {kind_a!r}; expected one of {list(INTERFERENCE_KINDS_A)}")
        if kind_b not in INTERFERENCE_KINDS_B:
            raise ValueError(f"kind_b {kind_b!r}; expected one of {list(INTERFERENCE_KINDS_B)}")
        if share_a is not None and not (0.0 < share_a <= 1.0):  # also refuses NaN
            raise ValueError(f"share_a {share_a!r}: an SM share must be in (0, 1], or None for no partition")
        if self._none:
            return 1.0, 1.0
        pair = self._pairs.get((kind_a, kind_b))
        if pair is None:
            raise TableError(f"{self._file()}: no rows for kind_a={kind_a!r}, kind_b={kind_b!r}; the table "
                             f"holds {sorted(self._pairs)}")
        if share_a is None:
            if pair.streams is None:
                raise TableError(f"{self._file()}: no 'streams' (or 'threads') rows for kind_a={kind_a!r}, "
                                 f"kind_b={kind_b!r}, so there is nothing for co-running without an SM partition")
            a, b = pair.streams
        else:
            if not pair.shares:
                raise TableError(f"{self._file()}: the table has no SM-partition measurements (no "
                                 f"'green_context' or 'time_share' rows for kind_a={kind_a!r}, kind_b={kind_b!r}; "
                                 f"interference_method: {self.method!r}); ask with share_a=None (plain "
                                 "streams) or measure with green contexts (CUDA) or the time share (a CPU "
                                 "calibration)")
            a, b = pair.partition(share_a)
        a, b = (a if a > 1.0 else 1.0), (b if b > 1.0 else 1.0)
        if self.scale != 1.0:
            k = self.scale
            return 1.0 + k * (a - 1.0), 1.0 + k * (b - 1.0)
        return a, b

    def has_partitions(self, kind_a: str, kind_b: str) -> bool:
        """Whether SM-share queries for this pair can be answered."""
        if self._none:
            return True
        pair = self._pairs.get((kind_a, kind_b))
        return pair is not None and bool(pair.shares)

    def _file(self) -> str:
        name = self.metadata.get("tables", {}).get("interference", "interference")
        return str(self.directory / name) if self.directory else "interference"

    def __repr__(self) -> str:
        where = self.directory if self.directory is not None else "no table"
        scale = "" if self.scale == 1.0 else f", scale={self.scale:g}"
        return f"InterferenceTable(method={self.method}, {where}{scale})"

