"""Read, validate and write cost-table directories (the format in schema.py / FORMAT.md).

Reading turns each required table into a :class:`Grid` -- the key axes and a 2-D array of latencies --
after checking that it is a full rectangular grid of positive, finite numbers. Every error names the
directory, the file, the row or column, and what was expected.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from simcolo.costs.schema import METADATA_FILE, REQUIRED_TABLES, TableSpec, validate_metadata
from simcolo.errors import TableError

#: Latencies are written with 7 significant digits: far below any measurement's noise, and it keeps
#: files small and byte-reproducible.
FLOAT_FORMAT = "{:.6e}"

_MAX_LISTED = 5  # how many offending points an error message lists


@dataclass(frozen=True)
class Grid:
    """A validated table: ``values[i, j]`` is the latency at ``(rows[i], cols[j])``; both axes strictly
    increase."""

    table: str
    row_axis: str
    col_axis: str
    rows: np.ndarray   # float64, the first key column's distinct values
    cols: np.ndarray   # float64, the second key column's distinct values
    values: np.ndarray  # float64, shape (len(rows), len(cols))


# ----------------------------------------------------------------------------------------- reading

def read_metadata(directory: Path) -> dict:
    """Load and validate ``<directory>/metadata.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TableError(f"cost-table directory {directory} does not exist")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise TableError(f"{directory}: no {METADATA_FILE}; a cost-table directory needs one "
                         "(see simcolo/costs/FORMAT.md)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: not valid JSON ({exc})") from exc
    validate_metadata(meta, path)
    for name, file in meta["tables"].items():
        if not (directory / file).is_file():
            raise TableError(f"{path}: table '{name}' names file {file!r}, which is not in {directory}")
    return meta


def read_frame(path: Path) -> pd.DataFrame:
    """A table file as a DataFrame; the suffix (.csv or .parquet) picks the reader."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        raise TableError(f"{path}: cannot be read as {path.suffix[1:]} "
                         f"({type(exc).__name__}: {exc})") from exc


def read_grid(directory: Path, spec: TableSpec, file: str) -> Grid:
    path = Path(directory) / file
    return grid_from_frame(read_frame(path), spec, path)


def read_required_grids(directory: Path, meta: Mapping) -> dict[str, Grid]:
    return {name: read_grid(directory, spec, meta["tables"][name]) for name, spec in REQUIRED_TABLES.items()}


def _row_label(path: Path, i: int) -> str:
    """Human row reference; for CSV also the line (header is line 1)."""
    return f"row {i + 1} (line {i + 2})" if path.suffix == ".csv" else f"row {i + 1}"


def _cell(df: pd.DataFrame, column: str, i: int) -> str:
    """The offending cell as written (numpy scalars shown as plain Python values)."""
    value = df[column].iloc[i]
    return repr(value.item() if hasattr(value, "item") else value)


def require_columns(df: pd.DataFrame, name: str, columns, path: Path, optional=()) -> None:
    """The table ``name`` read from ``path`` has every one of ``columns`` and at least one row."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        extra = f" (optional: {list(optional)})" if optional else ""
        raise TableError(f"{path}: table '{name}' lacks column(s) {missing}; expected columns "
                         f"{list(columns)}{extra}, found {list(df.columns)}")
    if len(df) == 0:
        raise TableError(f"{path}: table '{name}' has no rows")


def numeric_column(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise TableError(f"{path}: {_row_label(path, i)}, column '{column}': {_cell(df, column, i)} "
                         "is not a finite number")
    return values


def grid_from_frame(df: pd.DataFrame, spec: TableSpec, path: Path) -> Grid:
    """Validate ``df`` against ``spec`` and reshape it to a :class:`Grid`. ``path`` is for messages."""
    require_columns(df, spec.name, spec.columns, path, spec.optional)
    columns = {c: numeric_column(df, c, path) for c in (*spec.columns, *spec.optional) if c in df.columns}
    for key in spec.keys:
        v = columns[key]
        bad = np.flatnonzero((v != np.round(v)) | (v < 1))
        if bad.size:
            i = int(bad[0])
            raise TableError(f"{path}: {_row_label(path, i)}, column '{key}': {_cell(df, key, i)}; "
                             "expected a positive integer")
    lat = columns[spec.value]
    bad = np.flatnonzero(lat <= 0)
    if bad.size:
        i = int(bad[0])
        raise TableError(f"{path}: {_row_label(path, i)}, column '{spec.value}': "
                         f"{_cell(df, spec.value, i)}; expected a latency > 0 seconds")
    for col in spec.optional:
        if col in columns and (bad := np.flatnonzero(columns[col] < 0)).size:
            i = int(bad[0])
            raise TableError(f"{path}: {_row_label(path, i)}, column '{col}': {_cell(df, col, i)}; "
                             "expected a value >= 0")

    a, b = (columns[k] for k in spec.keys)
    dup = pd.DataFrame({"a": a, "b": b}).duplicated(keep=False).to_numpy()
    if dup.any():
        first = np.flatnonzero(dup)
        same = first[(a[first] == a[first[0]]) & (b[first] == b[first[0]])]
        rows = ", ".join(_row_label(path, int(i)) for i in same[:_MAX_LISTED])
        raise TableError(f"{path}: duplicate key ({spec.keys[0]}={int(a[first[0]])}, "
                         f"{spec.keys[1]}={int(b[first[0]])}) in {rows}; each grid point must appear once")
    rows, cols = np.unique(a), np.unique(b)
    for axis, values in zip(spec.keys, (rows, cols)):
        if values.size < 2:
            raise TableError(f"{path}: column '{axis}' has {values.size} distinct value(s); "
                             "interpolation needs a grid with at least 2 values on each axis")
    if len(a) != rows.size * cols.size:
        present = set(zip(a.tolist(), b.tolist()))
        holes = [(int(x), int(y)) for x in rows.tolist() for y in cols.tolist() if (x, y) not in present]
        listed = ", ".join(map(str, holes[:_MAX_LISTED])) + (" ..." if len(holes) > _MAX_LISTED else "")
        raise TableError(f"{path}: table '{spec.name}' is not a full rectangular grid over "
                         f"({spec.keys[0]}, {spec.keys[1]}): expected {rows.size} x {cols.size} = "
                         f"{rows.size * cols.size} points, found {len(a)}; missing {len(holes)} "
                         f"point(s) ({spec.keys[0]}, {spec.keys[1]}): {listed}")
    order = np.lexsort((b, a))
    values = lat[order].reshape(rows.size, cols.size)
    return Grid(spec.name, spec.keys[0], spec.keys[1], rows.astype(np.float64), cols.astype(np.float64),
                np.ascontiguousarray(values))


# ----------------------------------------------------------------------------------------- writing

def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def grid_csv(spec: TableSpec, rows: Sequence[Sequence[float]]) -> str:
    """CSV text of a table: integer keys, then the latency with :data:`FLOAT_FORMAT`; rows as given."""
    lines = [",".join(spec.columns)]
    for a, b, latency in rows:
        lines.append(f"{int(a)},{int(b)},{FLOAT_FORMAT.format(latency)}")
    return "\n".join(lines) + "\n"


def write_table_dir(directory: Path, metadata: Mapping, csv_tables: Mapping[str, str]) -> None:
    """Write ``metadata.json`` and the CSV texts ``csv_tables[file name]`` into ``directory``.

    The metadata is validated first; JSON is written with sorted keys so output is reproducible.
    """
    directory = Path(directory)
    validate_metadata(dict(metadata), directory / METADATA_FILE)
    directory.mkdir(parents=True, exist_ok=True)
    for file, text in csv_tables.items():
        _atomic_write_text(directory / file, text)
    _atomic_write_text(directory / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
