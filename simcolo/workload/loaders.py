"""Streaming trace loaders: Azure LLM inference CSV, BurstGPT CSV, plain CSV and Mooncake JSONL.

``read_trace`` yields pandas DataFrame chunks with the columns ``arrival_s`` (float seconds since the
file's first row), ``prompt_tokens`` and ``output_tokens`` (int64) and ``line`` (the 1-based line of the
row in the file; the CSV header is line 1). Only one chunk is in memory at a time.

Rows that a format marks as failed requests (BurstGPT rows with 0 response tokens) are left out of
the chunk; their line numbers are in ``chunk.attrs["failed_lines"]`` (a tuple) so the caller can count them.
Anything else that is not a valid request is a :class:`TraceError`: no row is dropped silently.
Blank lines at the very end of a file are tolerated (editors add them); a blank line followed by
more data is an error.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np
import pandas as pd

from simcolo.errors import ConfigError, TraceError
from simcolo.workload.checks import Timeline, numbers, require_columns, token_counts, trace_error
from simcolo.workload.mooncake import KEYS as MOONCAKE_KEYS

CHUNKSIZE = 65536
FORMATS = ("azure", "mooncake", "burstgpt", "csv")
COLUMNS = ["arrival_s", "prompt_tokens", "output_tokens", "line"]


def make_chunk(arrival_s, prompt_tokens, output_tokens, lines, failed_lines=None) -> pd.DataFrame:
    chunk = pd.DataFrame(
        {"arrival_s": arrival_s, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "line": lines},
        columns=COLUMNS,
    ).astype({"arrival_s": np.float64, "prompt_tokens": np.int64, "output_tokens": np.int64, "line": np.int64})
    # A tuple, not an array: pandas compares attrs with == when concatenating chunks.
    chunk.attrs["failed_lines"] = () if failed_lines is None else tuple(np.asarray(failed_lines).tolist())
    return chunk


# --- arrival-time columns ---------------------------------------------------------------------------

class _AzureTimes:
    """``2023-11-16 18:15:46.6805900`` (up to 9 fractional digits) to int64 nanoseconds.

    The fraction is optional row by row: the 2024 Azure traces write ``00:00:00.001163`` and, on a whole
    second, ``00:00:01`` in one file. The week-long 2024 traces add a ``+00:00`` offset; whether a file has
    one is read from its first row. Explicit formats keep pandas on its fast path (the whole conv trace
    parses in a few ms): a chunk is parsed with the fraction, and only the rows that missed are parsed
    again without it.
    """

    per_second = 1e9
    expected = "a timestamp 'YYYY-MM-DD HH:MM:SS[.fffffff]' (optionally with a +HH:MM offset)"
    #: (with a fraction, on a whole second), by whether the file's timestamps carry an offset
    _formats_by_offset: ClassVar[dict[bool, tuple[str, str]]] = {False: ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"),
                          True: ("%Y-%m-%d %H:%M:%S.%f%z", "%Y-%m-%d %H:%M:%S%z")}

    def __init__(self):
        self._formats: tuple[str, str] | None = None

    def __call__(self, path: Path, values: pd.Series, lines: np.ndarray, column: str) -> np.ndarray:
        if values.isna().any():
            i = int(np.argmax(values.isna().to_numpy()))
            raise trace_error(path, int(lines[i]), column, "empty cell; expected " + self.expected)
        if self._formats is None:
            first = values.iloc[:1]
            has_offset = any(not np.isnat(self._parse(first, f)[0]) for f in self._formats_by_offset[True])
            self._formats = self._formats_by_offset[has_offset]
        fraction, whole = self._formats
        parsed = self._parse(values, fraction)
        missed = np.isnat(parsed)
        if missed.any():
            parsed = parsed.copy()    # pandas may hand out a read-only view
            parsed[missed] = self._parse(values[missed], whole)
            bad = np.isnat(parsed)
            if bad.any():
                i = int(np.argmax(bad))
                raise trace_error(path, int(lines[i]), column,
                                  f"unparsable timestamp {values.iloc[i]!r}; expected {self.expected}")
        return parsed.view(np.int64)

    @staticmethod
    def _parse(values: pd.Series, fmt: str) -> np.ndarray:
        """datetime64[ns] (UTC, naive), NaT where ``fmt`` does not match."""
        parsed = pd.to_datetime(values, format=fmt, errors="coerce", utc=fmt.endswith("%z"))
        if parsed.dt.tz is not None:
            parsed = parsed.dt.tz_convert(None)
        return parsed.to_numpy(dtype="datetime64[ns]")


class _Seconds:
    """A numeric column in seconds (BurstGPT ``Timestamp``, plain ``arrival_s``)."""

    per_second = 1.0

    def __call__(self, path: Path, values: pd.Series, lines: np.ndarray, column: str) -> np.ndarray:
        return numbers(path, values, lines, column, "a finite number of seconds")


# --- CSV formats -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CsvFormat:
    time: str
    prompt: str
    output: str
    required: tuple[str, ...]
    times: Callable[[], Callable]          # a fresh arrival-time parser per file
    time_as_text: bool = False
    drops_failed: bool = False             # rows with 0 output tokens are failed requests (BurstGPT)


CSV_FORMATS = {
    "azure": CsvFormat("TIMESTAMP", "ContextTokens", "GeneratedTokens",
                       ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), _AzureTimes, time_as_text=True),
    "burstgpt": CsvFormat("Timestamp", "Request tokens", "Response tokens",
                          ("Timestamp", "Model", "Request tokens", "Response tokens"), _Seconds, drops_failed=True),
    "csv": CsvFormat("arrival_s", "prompt_tokens", "output_tokens",
                     ("arrival_s", "prompt_tokens", "output_tokens"), _Seconds),
}


@contextlib.contextmanager
def _pandas_errors(path: Path):
    """Turn pandas' parser errors (ragged rows, bad bytes) into TraceErrors that name the file."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path}: empty file; expected a header line and at least one data row") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot parse the file as CSV: {exc}") from exc


def _csv_columns(path: Path) -> list[str]:
    with _pandas_errors(path):
        return pd.read_csv(path, nrows=0).columns.tolist()


# --- telling a file's format from its first line --------------------------------------------------------

def _first_line(path: Path) -> tuple[int, str] | None:
    """The first non-blank line (1-based number, text), or None for a file of blank lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                return number, text
    return None


def _json_object(text: str) -> dict | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _csv_format_of(columns: list[str]) -> str | None:
    """The CSV format whose required columns are all among ``columns`` (their column sets are disjoint)."""
    return next((name for name, fmt in CSV_FORMATS.items() if set(fmt.required) <= set(columns)), None)


_LOOKS_LIKE = {"azure": "an Azure LLM inference trace", "mooncake": "a Mooncake trace (JSON lines)",
               "burstgpt": "a BurstGPT trace", "csv": "a plain CSV trace"}


def _use(found: str, format_key: str) -> str:
    return f"this looks like {_LOOKS_LIKE[found]}: set {format_key}={found}"


def _check_csv_header(path: Path, fmt: CsvFormat, format_key: str) -> None:
    first = _first_line(path)
    obj = _json_object(first[1]) if first is not None else None
    if obj is not None:
        hint = _use("mooncake", format_key) if set(MOONCAKE_KEYS) <= set(obj) else \
            f"expected a CSV file with columns {list(fmt.required)}"
        raise TraceError(f"{path}: line {first[0]}: a JSON object with keys {sorted(obj)}, not a CSV header; {hint}")
    found = _csv_columns(path)
    missing = [c for c in fmt.required if c not in found]
    other = _csv_format_of(found) if missing else None
    require_columns(path, found, fmt.required, hint=_use(other, format_key) if other else "")


def _check_json_lines(path: Path, format_key: str) -> None:
    """A Mooncake trace whose first line is a CSV header of a known format is named as that format; any
    other problem is left to the streaming reader, which names the line."""
    first = _first_line(path)
    if first is None or _json_object(first[1]) is not None:
        return
    try:
        other = _csv_format_of(_csv_columns(path))
    except TraceError:     # not CSV either
        return
    if other is not None:
        raise TraceError(f"{path}: line {first[0]}: a CSV header, not a JSON object; {_use(other, format_key)}")


def _trailing_blank_start(blank: np.ndarray) -> int:
    """Index where the run of blank rows at the end of ``blank`` starts (len if none)."""
    if not blank[-1]:
        return len(blank)
    return len(blank) - int(np.argmax(~blank[::-1])) if not blank.all() else 0


def _read_csv(path: Path, fmt: CsvFormat, chunksize: int) -> Iterator[pd.DataFrame]:
    # All columns are read (no usecols) so that pandas rejects ragged rows instead of ignoring extra fields.
    times = fmt.times()
    timeline = Timeline(path, fmt.time, times.per_second)
    next_line = 2                 # the header is line 1
    num_rows = 0
    blank_line = None             # first line of a run of blank lines not yet known to be trailing
    with _pandas_errors(path):
        reader = pd.read_csv(
            path, chunksize=chunksize, skip_blank_lines=False, index_col=False,
            dtype={fmt.time: str} if fmt.time_as_text else None,
        )
    with _pandas_errors(path), reader:
        for raw in reader:
            lines = np.arange(next_line, next_line + len(raw), dtype=np.int64)
            next_line += len(raw)
            if len(raw) == 0:
                continue
            blank = raw.isna().all(axis=1).to_numpy()
            if blank_line is not None and not blank.all():
                raise trace_error(path, blank_line, fmt.time, "blank line inside the trace; expected a data row")
            keep = _trailing_blank_start(blank)
            if blank[:keep].any():
                i = int(np.argmax(blank[:keep]))
                raise trace_error(path, int(lines[i]), fmt.time, "blank line inside the trace; expected a data row")
            if keep < len(raw):
                blank_line = int(lines[keep]) if blank_line is None else blank_line
                raw, lines = raw.iloc[:keep], lines[:keep]
            if len(raw) == 0:
                continue
            num_rows += len(raw)
            yield _parse_csv_chunk(path, fmt, times, timeline, raw, lines)
    if num_rows == 0:
        raise TraceError(f"{path}: no requests (header only); expected at least one data row")


def _parse_csv_chunk(path, fmt: CsvFormat, times, timeline: Timeline, raw: pd.DataFrame, lines: np.ndarray):
    arrival = timeline.relative(times(path, raw[fmt.time], lines, fmt.time), lines)
    if not fmt.drops_failed:
        prompt = token_counts(path, raw[fmt.prompt], lines, fmt.prompt, 1)
        output = token_counts(path, raw[fmt.output], lines, fmt.output, 1)
        return make_chunk(arrival, prompt, output, lines)
    output = token_counts(path, raw[fmt.output], lines, fmt.output, 0)
    prompt = token_counts(path, raw[fmt.prompt], lines, fmt.prompt, 0)
    ok = output > 0
    if (prompt[ok] < 1).any():
        i = int(np.argmax(ok & (prompt < 1)))
        raise trace_error(path, int(lines[i]), fmt.prompt, f"expected an integer >= 1, got {prompt[i]}")
    return make_chunk(arrival[ok], prompt[ok], output[ok], lines[ok], failed_lines=lines[~ok])


# --- entry points ------------------------------------------------------------------------------------

def check_trace(path: str | Path, fmt: str, format_key: str = "format") -> Path:
    """Fail early (missing file, unknown format, missing columns, a file of another known format, named
    with ``format_key``: the config key that chose ``fmt``) before any streaming starts."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown trace format {fmt!r}; expected one of {list(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    if fmt in CSV_FORMATS:
        _check_csv_header(path, CSV_FORMATS[fmt], format_key)
    else:
        _check_json_lines(path, format_key)
    return path


def read_trace(path: str | Path, fmt: str, chunksize: int = CHUNKSIZE) -> Iterator[pd.DataFrame]:
    """Stream a trace file as validated DataFrame chunks of at most ``chunksize`` rows."""
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ConfigError(f"chunksize must be a positive integer, got {chunksize!r}")
    path = check_trace(path, fmt)
    if fmt == "mooncake":
        from simcolo.workload.mooncake import read_mooncake

        return read_mooncake(path, chunksize)
    return _read_csv(path, CSV_FORMATS[fmt], chunksize)


def read_lengths(path: str | Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """All (prompt_tokens, output_tokens) pairs of a trace, for empirical length sampling."""
    prompts, outputs = [], []
    for chunk in read_trace(path, fmt):
        prompts.append(chunk["prompt_tokens"].to_numpy())
        outputs.append(chunk["output_tokens"].to_numpy())
    prompt, output = np.concatenate(prompts), np.concatenate(outputs)
    if len(prompt) == 0:
        raise TraceError(f"{path}: no valid requests to sample lengths from")
    return prompt, output
