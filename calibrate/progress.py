"""The resumable record of a calibration run: ``<out>/.progress.jsonl``, one JSON line per point.

The first line is a header naming what is being measured (model config, gpu, device, dtype, tp); a
run whose header differs refuses to mix its points into the file. Every point, measured or skipped,
is appended as ``{"table", "point", "status": "ok"|"skipped", "rows" | "reason"}`` and flushed (and
fsync'ed) at once, so a calibration killed at any moment loses at most the point it was measuring; a
torn last line is ignored. A restarted run skips the points already in the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from simcolo.errors import ConfigError

PROGRESS_FILE = ".progress.jsonl"


def point_key(table: str, point: dict[str, Any]) -> str:
    """The identity of a point: its table and its key values (order-independent)."""
    return table + "|" + json.dumps(point, sort_keys=True, separators=(",", ":"))


class ProgressLog:
    def __init__(self, out_dir: Path, header: dict[str, Any], fresh: bool = False):
        self.path = Path(out_dir) / PROGRESS_FILE
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = json.loads(json.dumps(header))  # normalise (tuples -> lists) for comparison
        if fresh or not self.path.exists():
            self._fh = open(self.path, "w")
            self._write({"header": header})
            return
        text = self.path.read_text()
        lines = text.splitlines()
        found = _parse(lines[0]) if lines else None
        if found is None or found.get("header") != header:
            theirs = (found or {}).get("header", {})
            diff = sorted(k for k in set(header) | set(theirs) if header.get(k) != theirs.get(k))
            raise ConfigError(f"{self.path} records a calibration of something else (differs in "
                              f"{diff or 'its header'}); choose another out=, or pass fresh=true to "
                              "discard it and start over")
        for line in lines[1:]:
            rec = _parse(line)
            if rec is not None and "table" in rec and "point" in rec:
                self.records[point_key(rec["table"], rec["point"])] = rec
        self._fh = open(self.path, "a")
        if not text.endswith("\n"):
            self._fh.write("\n")  # a torn last line: start the next record on its own line

    def get(self, table: str, point: dict[str, Any]) -> dict[str, Any] | None:
        return self.records.get(point_key(table, point))

    def add(self, table: str, point: dict[str, Any], *, rows: list[dict] | None = None,
            reason: str | None = None, final: bool = True) -> dict[str, Any]:
        """Record a point: ``rows`` if measured, ``reason`` if skipped. ``final=False`` marks a skip
        that a later run should re-evaluate (one decided by a memory estimate, which costs nothing)."""
        rec: dict[str, Any] = {"table": table, "point": point}
        if reason is None:
            rec.update(status="ok", rows=rows or [])
        else:
            rec.update(status="skipped", reason=reason, final=final)
        self.records[point_key(table, point)] = rec
        self._write(rec)
        return rec

    def done(self, table: str, point: dict[str, Any]) -> bool:
        rec = self.get(table, point)
        return rec is not None and (rec["status"] == "ok" or rec.get("final", True))

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def progress_bar(items: Iterable, total: int, enabled: bool | None) -> Iterator:
    """tqdm over the points; ``enabled=None`` shows it only when stderr is a terminal."""
    return iter(tqdm(items, total=total, desc="calibrate", unit="pt", disable=None if enabled is None
                     else not enabled, dynamic_ncols=True, leave=True))
