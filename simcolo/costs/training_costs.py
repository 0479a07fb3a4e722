"""Training costs from a cost-table directory: the ``train_stage`` and ``lora_step`` tables, written by
the roofline generator (``roofline_training.py``) or measured by calibrate/ (FORMAT.md).

Lookup rules (the same for roofline and measured tables):

* **Grid.** For each (``num_stages``, ``stage``, ``phase``) of ``train_stage`` and each (``rank``,
  ``phase``) of ``lora_step`` the rows form a surface over (``micro_batch``, ``seq_len``). Inside it a
  query is bilinear; grid points return the stored value exactly; outside, the edge cell is extended
  linearly, every such query is counted in ``off_grid[table][axis]`` and warned about once per
  table, axis and side (:class:`~simcolo.costs.interp.OffGridWarning`); extrapolated latencies are
  floored at ``MIN_LATENCY_S``, memory at 0.
* **Holes.** Measured tables may lack points (skipped: they did not fit in memory). Decision: the
  *largest rectangular sub-grid* is kept, chosen greedily as calibrate/ does for ``prefill`` and
  ``decode`` -- the micro-batch or sequence-length line with the largest share of missing points
  (the larger value on a tie) is dropped until no point is missing; the dropped lines are listed in
  :attr:`TrainingCosts.dropped`. Queries beyond what is left extrapolate (and are counted). No
  nearest-neighbour fill: copying a smaller point's time into a larger hole would underestimate it.
  Fewer than 2 values left on an axis is a :class:`TableError`.
* **Stages.** calibrate/ measures only the first, one middle and the last stage of each split.
  A queried stage present in the table is used as is; otherwise stage 0 maps to the smallest stage
  present, ``num_stages - 1`` to the largest, and a middle stage to the nearest present middle stage
  (the lower one on a tie; the nearest present stage if no middle one was measured). A middle stage
  mapped onto another middle stage is scaled by the ratio of their decoder layers (the model's split,
  as ``schema.stage_layers``): a middle stage is nothing but its layers. A ``num_stages``
  that the table lacks is a :class:`TableError` listing those it has.
* **LoRA rank.** A rank present is used as is; another is linear in rank between the neighbouring
  ranks (outside their range: extrapolated from the edge pair and counted in
  ``off_grid['lora_step']['rank']``); a table with a single rank answers every rank with it (counted
  when the rank differs).

Every defect of the files -- a missing table, column or phase, a value that is not a finite number,
a negative latency, a duplicate point -- is a :class:`TableError` naming the file, the row (and CSV
line) or column, and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from simcolo.costs.interp import MIN_LATENCY_S, OffGrid, cell
from simcolo.costs.schema import METADATA_FILE, RESERVED_COLUMNS, TRAINING_PHASES, stage_layers
from simcolo.costs.tables import _cell, _row_label, numeric_column, read_frame, read_metadata, require_columns
from simcolo.errors import TableError

_MAX_LISTED = 6


# ----------------------------------------------------------------------------------------- reading
# Shared with interference_table.py.

def read_reserved_table(directory: Path, meta: dict, name: str, hint: str = "") -> tuple[Path, pd.DataFrame]:
    """The file of reserved table ``name`` as a DataFrame, checked to exist, to have the columns of
    ``RESERVED_COLUMNS[name]`` and at least one row."""
    tables = meta["tables"]
    if name not in tables:
        raise TableError(f"{directory}: {METADATA_FILE} 'tables' has no '{name}' table (it names "
                         f"{sorted(tables)}){hint}")
    path = Path(directory) / tables[name]
    df = read_frame(path)
    require_columns(df, name, RESERVED_COLUMNS[name], path)
    return path, df


def numbers(df: pd.DataFrame, column: str, path: Path, *, integer: bool = False, minimum: float | None = None,
            strict: bool = False, maximum: float | None = None, expected: str = "") -> list:
    """Column ``column`` as a list of Python numbers (ints with ``integer``), every value checked to be
    finite, integral, >= (``strict``: >) ``minimum`` and <= ``maximum``; the first offender is a
    TableError saying ``expected``."""
    values = numeric_column(df, column, path)
    bad = np.zeros(len(values), dtype=bool)
    if integer:
        bad |= values != np.round(values)
    if minimum is not None:
        bad |= (values <= minimum) if strict else (values < minimum)
    if maximum is not None:
        bad |= values > maximum
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TableError(f"{path}: {_row_label(path, i)}, column '{column}': {_cell(df, column, i)}; "
                         f"expected {expected}")
    return [int(v) for v in values] if integer else values.tolist()


def choices(df: pd.DataFrame, column: str, path: Path, allowed: Sequence[str]) -> list[str]:
    """Column ``column`` as strings, each one of ``allowed``."""
    values = df[column].tolist()
    for i, v in enumerate(values):
        if not isinstance(v, str) or v not in allowed:
            raise TableError(f"{path}: {_row_label(path, i)}, column '{column}': {v!r}; expected one of "
                             f"{list(allowed)}")
    return values


def _no_duplicates(keys: list[tuple], names: Sequence[str], path: Path) -> None:
    seen: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            point = ", ".join(f"{n}={v}" for n, v in zip(names, k))
            raise TableError(f"{path}: duplicate point ({point}) in {_row_label(path, seen[k])} and "
                             f"{_row_label(path, i)}; each point must appear once")
        seen[k] = i


# ----------------------------------------------------------------------------------------- surfaces

class _Surface:
    """Latency and peak memory over (micro_batch, seq_len) of one (stage, phase) or (rank, phase): a
    full rectangular grid, ``lat[i][j]`` at ``(xs[i], ys[j])``."""

    __slots__ = ("xs", "ys", "lat", "mem", "x_lo", "x_hi", "y_lo", "y_hi")

    def __init__(self, xs: list[float], ys: list[float], lat: list[list[float]], mem: list[list[float]]):
        self.xs, self.ys, self.lat, self.mem = xs, ys, lat, mem
        self.x_lo, self.x_hi, self.y_lo, self.y_hi = xs[0], xs[-1], ys[0], ys[-1]

    def at(self, z: list[list[float]], x: float, y: float) -> float:
        i, t = cell(self.xs, x)
        j, u = cell(self.ys, y)
        r0, r1 = z[i], z[i + 1]
        w = 1.0 - u
        return (1.0 - t) * (w * r0[j] + u * r0[j + 1]) + t * (w * r1[j] + u * r1[j + 1])


def _surface(points: dict[tuple[int, int], tuple[float, float]], path: Path, label: str,
             dropped: list[str]) -> _Surface:
    """The largest full (micro_batch x seq_len) grid of ``points`` (greedy, see the module docstring);
    each dropped line is appended to ``dropped``."""
    axes = [sorted({p[0] for p in points}), sorted({p[1] for p in points})]
    names = ("micro_batch", "seq_len")
    while True:
        holes = [(x, y) for x in axes[0] for y in axes[1] if (x, y) not in points]
        if not holes:
            break
        _, value, k = max((sum(h[k] == v for h in holes) / len(axes[1 - k]), v, k) for k in (0, 1) for v in axes[k])
        axes[k].remove(value)
        dropped.append(f"{label}: {names[k]}={value} (points missing)")
    for k in (0, 1):
        if len(axes[k]) < 2:
            listed = ", ".join(map(str, sorted(points)[:_MAX_LISTED])) + (" ..." if len(points) > _MAX_LISTED else "")
            raise TableError(f"{path}: {label}: the points present (micro_batch, seq_len) {listed} hold no "
                             f"full grid with at least 2 values of both micro_batch and seq_len "
                             f"(left: micro_batch {axes[0]}, seq_len {axes[1]}); interpolation needs one")
    lat = [[points[(x, y)][0] for y in axes[1]] for x in axes[0]]
    mem = [[points[(x, y)][1] for y in axes[1]] for x in axes[0]]
    return _Surface([float(x) for x in axes[0]], [float(y) for y in axes[1]], lat, mem)


# ----------------------------------------------------------------------------------------- the class

class TrainingCosts:
    """Latency (seconds) and peak memory (bytes) of training phases on one GPU, from the ``train_stage``
    and ``lora_step`` tables of a cost-table directory (lookup rules: module docstring).

    ``metadata`` is the directory's metadata.json; ``off_grid[table][axis]`` counts queries that
    needed extrapolation (``train_stage``: ``micro_batch``, ``seq_len``; ``lora_step``: ``rank``,
    ``micro_batch``, ``seq_len``); ``dropped`` lists grid lines left out to keep surfaces rectangular.
    """

    def __init__(self, directory: Path, metadata: dict, stages: dict, stage_layers_measured: dict,
                 lora: dict, dropped: list[str]):
        self.directory = Path(directory)
        self.metadata = metadata
        self.dropped = dropped
        self._model_layers = int(metadata["model_config"]["num_layers"])
        self._stages = stages                      # (num_stages, stage) -> {phase: _Surface}
        self._stage_layers = stage_layers_measured  # (num_stages, stage) -> num_layers
        self._lora = lora                          # rank -> {phase: _Surface}
        self._ranks = sorted(lora)
        self._rank_list = [float(r) for r in self._ranks]
        self._resolved: dict[tuple[int, int], tuple[dict, float]] = {}
        self._off = OffGrid.for_axes({"train_stage": ("micro_batch", "seq_len"),
                                      "lora_step": ("rank", "micro_batch", "seq_len")}, str(self.directory),
                                     "TrainingCosts")
        self.off_grid = self._off.counts

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, directory: str | Path) -> "TrainingCosts":
        """Read ``train_stage`` and ``lora_step`` of a cost-table directory (roofline or measured);
        :class:`TableError` if either is missing or malformed."""
        directory = Path(directory)
        meta = read_metadata(directory)
        hint = ("; roofline directories get it from `python -m simcolo.costs.roofline` (generator v3 or "
                "later), calibrate/ writes it when `measure` includes it")
        for name in ("train_stage", "lora_step"):
            if name not in meta["tables"]:
                raise TableError(f"{directory}: {METADATA_FILE} 'tables' has no '{name}' table (it names "
                                 f"{sorted(meta['tables'])}){hint}")
        layers = meta["model_config"].get("num_layers") if isinstance(meta["model_config"], dict) else None
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise TableError(f"{directory / METADATA_FILE}: model_config.num_layers = {layers!r}; expected a "
                             "positive integer (the stage split needs it)")
        dropped: list[str] = []
        stages, stage_layers_measured = _read_train_stage(directory, meta, layers, dropped)
        lora = _read_lora_step(directory, meta, dropped)
        return cls(directory, meta, stages, stage_layers_measured, lora, dropped)

    # ------------------------------------------------------------------------------ lookups

    @property
    def stage_counts(self) -> list[int]:
        """The ``num_stages`` values the table holds."""
        return sorted({n for n, _ in self._stages})

    @property
    def lora_ranks(self) -> list[int]:
        return list(self._ranks)

    def stage_s(self, num_stages: int, stage: int, phase: str, micro_batch: int, seq_len: int) -> float:
        """Seconds of ``phase`` (``forward``, ``backward``, ``optimizer``) of pipeline stage ``stage`` of
        ``num_stages`` for one micro-batch of ``micro_batch`` sequences of ``seq_len`` tokens."""
        surfaces, scale = self._stage(num_stages, stage)
        surf = surfaces.get(phase)
        if surf is None:
            raise ValueError(f"unknown training phase {phase!r}; expected one of {list(TRAINING_PHASES)}")
        off = self._check(surf, "train_stage", micro_batch, seq_len)
        value = surf.at(surf.lat, micro_batch, seq_len) * scale
        if off and value < MIN_LATENCY_S:
            value = MIN_LATENCY_S
        return value

    def stage_peak_memory_bytes(self, num_stages: int, stage: int, micro_batch: int, seq_len: int) -> float:
        """Peak memory of the stage over its three phases (weights, gradients, optimizer state and the
        micro-batch's activations)."""
        surfaces, scale = self._stage(num_stages, stage)
        off = self._check_many(surfaces.values(), "train_stage", micro_batch, seq_len)
        value = max(s.at(s.mem, micro_batch, seq_len) for s in surfaces.values()) * scale
        return max(value, 0.0) if off else value

    def lora_s(self, rank: int, phase: str, micro_batch: int, seq_len: int) -> float:
        """Seconds of ``phase`` of the whole model with LoRA adapters of ``rank``."""
        if phase not in TRAINING_PHASES:
            raise ValueError(f"unknown training phase {phase!r}; expected one of {list(TRAINING_PHASES)}")
        return self._lora_value(rank, [phase], micro_batch, seq_len, "lat", MIN_LATENCY_S)

    def lora_peak_memory_bytes(self, rank: int, micro_batch: int, seq_len: int) -> float:
        """Peak memory of a LoRA step over its three phases."""
        return self._lora_value(rank, TRAINING_PHASES, micro_batch, seq_len, "mem", 0.0)

    # ------------------------------------------------------------------------------ internals

    def _check(self, surf: _Surface, table: str, x: float, y: float, depth: int = 4) -> bool:
        """Count (and warn about) a query outside ``surf``; ``depth`` is the warning's stacklevel (the
        frames from the warning up to the caller of the public method)."""
        if not (x > 0 and y > 0):
            raise ValueError(f"micro_batch and seq_len must be > 0, got {x!r}, {y!r}")
        off = False
        if x < surf.x_lo or x > surf.x_hi:
            self._off.note(table, "micro_batch", x, surf.x_lo, surf.x_hi, stacklevel=depth)
            off = True
        if y < surf.y_lo or y > surf.y_hi:
            self._off.note(table, "seq_len", y, surf.y_lo, surf.y_hi, stacklevel=depth)
            off = True
        return off

    def _check_many(self, surfaces, table: str, x: float, y: float, depth: int = 4) -> bool:
        """Like :meth:`_check` over several surfaces (their common range), counting each axis once."""
        surfaces = list(surfaces)
        if len(surfaces) == 1:
            return self._check(surfaces[0], table, x, y, depth + 1)
        if not (x > 0 and y > 0):
            raise ValueError(f"micro_batch and seq_len must be > 0, got {x!r}, {y!r}")
        x_lo, x_hi = max(s.x_lo for s in surfaces), min(s.x_hi for s in surfaces)
        y_lo, y_hi = max(s.y_lo for s in surfaces), min(s.y_hi for s in surfaces)
        off = False
        if x < x_lo or x > x_hi:
            self._off.note(table, "micro_batch", x, x_lo, x_hi, stacklevel=depth)
            off = True
        if y < y_lo or y > y_hi:
            self._off.note(table, "seq_len", y, y_lo, y_hi, stacklevel=depth)
            off = True
        return off

    def _stage(self, num_stages: int, stage: int) -> tuple[dict, float]:
        key = (num_stages, stage)
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        present = sorted(s for n, s in self._stages if n == num_stages)
        if not present:
            raise TableError(f"{self.directory}: table 'train_stage' has no rows for num_stages={num_stages}; "
                             f"it holds num_stages {self.stage_counts}")
        if not (0 <= stage < num_stages and stage == int(stage)):
            raise ValueError(f"stage {stage!r} must be an integer within [0, {num_stages})")
        stage = int(stage)
        last = num_stages - 1
        scale = 1.0
        if stage in present:
            mapped = stage
        elif stage == 0:
            mapped = present[0]
        elif stage == last:
            mapped = present[-1]
        else:
            middles = [s for s in present if 0 < s < last] or present
            mapped = min(middles, key=lambda s: (abs(s - stage), s))
            if 0 < mapped < last:
                want = len(stage_layers(self._model_layers, num_stages, stage))
                scale = want / self._stage_layers[(num_stages, mapped)]
        hit = self._resolved[key] = (self._stages[(num_stages, mapped)], scale)
        return hit

    def _lora_value(self, rank: float, phases: Sequence[str], x: float, y: float, which: str,
                    floor: float) -> float:
        if not rank > 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank!r}")
        ranks = self._ranks

        def value(r: int) -> float:
            surfaces = self._lora[r]
            return max(surfaces[p].at(getattr(surfaces[p], which), x, y) for p in phases)

        if rank in self._lora:
            off = self._check_many([self._lora[rank][p] for p in phases], "lora_step", x, y, 5)
            v = value(rank)
            return max(v, floor) if off else v
        if len(ranks) == 1:
            self._off.note("lora_step", "rank", rank, ranks[0], ranks[0], stacklevel=4)
            self._check_many([self._lora[ranks[0]][p] for p in phases], "lora_step", x, y, 5)
            return max(value(ranks[0]), floor)
        i, t = cell(self._rank_list, rank)
        r0, r1 = ranks[i], ranks[i + 1]
        off = self._check_many([self._lora[r][p] for r in (r0, r1) for p in phases], "lora_step", x, y, 5)
        if rank < ranks[0] or rank > ranks[-1]:
            self._off.note("lora_step", "rank", rank, ranks[0], ranks[-1], stacklevel=4)
            off = True
        v = (1.0 - t) * value(r0) + t * value(r1)
        return max(v, floor) if off else v

    def __repr__(self) -> str:
        m = self.metadata
        return f"TrainingCosts({m['gpu']}, {m['model']}, source={m['source']}, {self.directory})"


# ----------------------------------------------------------------------------------------- table readers

def _group_surfaces(groups: dict, path: Path, label: Callable[[tuple], str], dropped: list[str]) -> dict:
    return {key: _surface(points, path, label(key), dropped) for key, points in sorted(groups.items())}


def _read_train_stage(directory: Path, meta: dict, model_layers: int, dropped: list[str]):
    path, df = read_reserved_table(directory, meta, "train_stage")
    n = numbers(df, "num_stages", path, integer=True, minimum=1, expected="a positive integer")
    s = numbers(df, "stage", path, integer=True, minimum=0, expected="an integer >= 0")
    layers = numbers(df, "num_layers", path, integer=True, minimum=1, expected="a positive integer")
    mb = numbers(df, "micro_batch", path, integer=True, minimum=1, expected="a positive integer")
    seq = numbers(df, "seq_len", path, integer=True, minimum=1, expected="a positive integer")
    phase = choices(df, "phase", path, TRAINING_PHASES)
    lat = numbers(df, "latency_s", path, minimum=0, strict=True, expected="a latency > 0 seconds")
    numbers(df, "latency_std_s", path, minimum=0, expected="a value >= 0")
    numbers(df, "repeats", path, minimum=0, expected="a value >= 0")
    mem = numbers(df, "peak_memory_bytes", path, minimum=0, expected="a value >= 0")
    for i in range(len(df)):
        if n[i] > model_layers:
            raise TableError(f"{path}: {_row_label(path, i)}, column 'num_stages': {n[i]}; expected at most "
                             f"the model's {model_layers} layers")
        if s[i] >= n[i]:
            raise TableError(f"{path}: {_row_label(path, i)}, column 'stage': {s[i]}; expected a stage "
                             f"within [0, num_stages={n[i]})")
        want = len(stage_layers(model_layers, n[i], s[i]))
        if layers[i] != want:
            raise TableError(f"{path}: {_row_label(path, i)}, column 'num_layers': {layers[i]}; stage {s[i]} "
                             f"of {n[i]} of a {model_layers}-layer model (metadata model_config) holds {want}")
    keys = list(zip(n, s, mb, seq, phase))
    _no_duplicates(keys, ("num_stages", "stage", "micro_batch", "seq_len", "phase"), path)
    groups: dict[tuple, dict] = {}
    stage_layers_measured: dict[tuple[int, int], int] = {}
    for i, (a, b, x, y, p) in enumerate(keys):
        groups.setdefault((a, b, p), {})[(x, y)] = (lat[i], mem[i])
        stage_layers_measured[(a, b)] = layers[i]
    for a, b in stage_layers_measured:
        missing = [p for p in TRAINING_PHASES if (a, b, p) not in groups]
        if missing:
            raise TableError(f"{path}: num_stages={a}, stage={b} has no rows for phase(s) {missing}; "
                             f"expected all of {list(TRAINING_PHASES)}")
    surfaces = _group_surfaces(groups, path, lambda k: f"num_stages={k[0]}, stage={k[1]}, phase={k[2]}", dropped)
    stages: dict[tuple[int, int], dict[str, _Surface]] = {}
    for (a, b, p), surf in surfaces.items():
        stages.setdefault((a, b), {})[p] = surf
    return stages, stage_layers_measured


def _read_lora_step(directory: Path, meta: dict, dropped: list[str]):
    path, df = read_reserved_table(directory, meta, "lora_step")
    rank = numbers(df, "rank", path, integer=True, minimum=1, expected="a positive integer")
    mb = numbers(df, "micro_batch", path, integer=True, minimum=1, expected="a positive integer")
    seq = numbers(df, "seq_len", path, integer=True, minimum=1, expected="a positive integer")
    phase = choices(df, "phase", path, TRAINING_PHASES)
    numbers(df, "num_layers", path, integer=True, minimum=1, expected="a positive integer")
    numbers(df, "trainable_params", path, minimum=0, expected="a value >= 0")
    lat = numbers(df, "latency_s", path, minimum=0, strict=True, expected="a latency > 0 seconds")
    numbers(df, "latency_std_s", path, minimum=0, expected="a value >= 0")
    numbers(df, "repeats", path, minimum=0, expected="a value >= 0")
    mem = numbers(df, "peak_memory_bytes", path, minimum=0, expected="a value >= 0")
    keys = list(zip(rank, mb, seq, phase))
    _no_duplicates(keys, ("rank", "micro_batch", "seq_len", "phase"), path)
    groups: dict[tuple, dict] = {}
    for i, (r, x, y, p) in enumerate(keys):
        groups.setdefault((r, p), {})[(x, y)] = (lat[i], mem[i])
    for r in sorted({r for r, _ in groups}):
        missing = [p for p in TRAINING_PHASES if (r, p) not in groups]
        if missing:
            raise TableError(f"{path}: rank={r} has no rows for phase(s) {missing}; expected all of "
                             f"{list(TRAINING_PHASES)}")
    surfaces = _group_surfaces(groups, path, lambda k: f"rank={k[0]}, phase={k[1]}", dropped)
    lora: dict[int, dict[str, _Surface]] = {}
    for (r, p), surf in surfaces.items():
        lora.setdefault(r, {})[p] = surf
    return lora
