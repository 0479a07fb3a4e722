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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from simcolo.errors import ConfigError, TraceError
from simcolo.workload.checks import Timeline, numbers, require_columns, token_counts, trace_error

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
    """``2023-11-16 18:15:46.6805900`` (7 fractional digits) to int64 nanoseconds.

    The 2024 week-long Azure traces add a ``+00:00`` offset; the variant is chosen from the first row.
    An explicit format keeps pandas on its fast path (the whole conv trace parses in a few ms).
    """

    per_second = 1e9
    expected = "a timestamp 'YYYY-MM-DD HH:MM:SS.fffffff' (optionally with a +HH:MM offset)"
    _formats = ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S.%f%z")

    def __init__(self):
        self._format: str | None = None

    def __call__(self, path: Path, values: pd.Series, lines: np.ndarray, column: str) -> np.ndarray:
        if values.isna().any():
            i = int(np.argmax(values.isna().to_numpy()))
            raise trace_error(path, int(lines[i]), column, "empty cell; expected " + self.expected)
        if self._format is None:
            self._format = next(
                (f for f in self._formats if not pd.isna(self._parse(values.iloc[:1], f).iloc[0])), self._formats[0]
            )
        parsed = self._parse(values, self._format)
        bad = parsed.isna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise trace_error(path, int(lines[i]), column, f"unparsable timestamp {values.iloc[i]!r}; expected {self.expected}")
        if parsed.dt.tz is not None:
            parsed = parsed.dt.tz_convert(None)
        return parsed.to_numpy(dtype="datetime64[ns]").view(np.int64)

    @staticmethod
    def _parse(values: pd.Series, fmt: str) -> pd.Series:
        return pd.to_datetime(values, format=fmt, errors="coerce", utc=fmt.endswith("%z"))


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


def _check_csv_header(path: Path, fmt: CsvFormat) -> None:
    with _pandas_errors(path):
        found = pd.read_csv(path, nrows=0).columns.tolist()
    require_columns(path, found, fmt.required)


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

def check_trace(path: str | Path, fmt: str) -> Path:
    """Fail early (missing file, unknown format, missing columns) before any streaming starts."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown trace format {fmt!r}; expected one of {list(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    if fmt in CSV_FORMATS:
        _check_csv_header(path, CSV_FORMATS[fmt])
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
