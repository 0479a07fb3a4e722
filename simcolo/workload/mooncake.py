"""Streaming loader for Mooncake JSONL traces.

One JSON object per line: ``timestamp`` (milliseconds), ``input_length``, ``output_length`` and
optionally ``hash_ids`` (prefix-cache block ids; ignored here). Lines are 1-based (there is no header).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from simcolo.errors import TraceError
from simcolo.workload.checks import Timeline, trace_error

KEYS = ("timestamp", "input_length", "output_length")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _tokens(path: Path, line: int, key: str, value) -> int:
    number = _number(value)
    if number is None or number != int(number):
        raise trace_error(path, line, key, f"expected an integer token count, got {value!r}")
    if number < 1:
        raise trace_error(path, line, key, f"expected an integer >= 1, got {value!r}")
    return int(number)


def _record(path: Path, line: int, text: str) -> tuple[float, int, int]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise trace_error(path, line, "-", f"invalid JSON ({exc.msg} at character {exc.pos + 1}); expected one JSON object") from None
    if not isinstance(obj, dict):
        raise trace_error(path, line, "-", f"expected a JSON object, got {type(obj).__name__}")
    for key in KEYS:
        if obj.get(key) is None:
            raise trace_error(path, line, key, f"missing or null key; found keys {sorted(obj)}; expected {list(KEYS)}")
    timestamp = _number(obj["timestamp"])
    if timestamp is None:
        raise trace_error(path, line, "timestamp", f"expected a finite number of milliseconds, got {obj['timestamp']!r}")
    return timestamp, _tokens(path, line, "input_length", obj["input_length"]), _tokens(path, line, "output_length", obj["output_length"])


def read_mooncake(path: Path, chunksize: int) -> Iterator[pd.DataFrame]:
    from simcolo.workload.loaders import make_chunk

    timeline = Timeline(path, "timestamp", 1e3)
    rows: list[tuple[float, int, int]] = []
    lines: list[int] = []
    num_rows = 0
    blank_line = None

    def flush() -> pd.DataFrame:
        line_arr = np.asarray(lines, np.int64)
        ts, prompt, output = (np.asarray(col) for col in zip(*rows))
        arrival = timeline.relative(ts.astype(np.float64), line_arr)
        rows.clear()
        lines.clear()
        return make_chunk(arrival, prompt, output, line_arr)

    try:
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    blank_line = blank_line or number
                    continue
                if blank_line is not None:
                    raise trace_error(path, blank_line, "-", "blank line inside the trace; expected a JSON object")
                rows.append(_record(path, number, text))
                lines.append(number)
                num_rows += 1
                if len(rows) == chunksize:
                    yield flush()
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text: {exc}") from None
    if rows:
        yield flush()
    if num_rows == 0:
        raise TraceError(f"{path}: no requests (empty file); expected one JSON object per line")
