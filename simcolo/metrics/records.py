"""Per-request records, streamed to parquet in row groups so memory does not grow with the trace."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from simcolo.workload.request import Request

# (column, arrow type); times are seconds since the workload start, NaN where it did not happen.
_RAW = [
    ("request_id", pa.int64()), ("arrival_s", pa.float64()), ("prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()), ("instance", pa.int32()), ("prefill_instance", pa.int32()),
    ("scheduled_s", pa.float64()), ("first_token_s", pa.float64()), ("finish_s", pa.float64()),
    ("preemptions", pa.int32()), ("status", pa.string()), ("model_version", pa.int64()),
]
_DERIVED = [("ttft_s", pa.float64()), ("tpot_s", pa.float64()), ("e2el_s", pa.float64())]
SCHEMA = pa.schema(_RAW + _DERIVED)
_NAN = float("nan")


class RequestSink:
    """Collects each request once it finishes or is given up on (``status`` says which).

    Rows are in completion order, which is deterministic for a given config and seed.
    With ``path=None`` the rows stay in memory (tests, notebooks).
    """

    def __init__(self, path: str | Path | None = None, flush_rows: int = 1 << 16):
        self.path = Path(path) if path is not None else None
        self._tmp = self.path.with_name(f".{self.path.name}.partial") if self.path else None
        self._writer = None
        self._tables: list[pa.Table] = []
        self._flush_rows = flush_rows
        self._cols: list[list] = [[] for _ in _RAW]
        self.count = 0
        self.status_counts: Counter[str] = Counter()

    def __call__(self, r: Request) -> None:
        c = self._cols
        c[0].append(r.id); c[1].append(r.arrival_s); c[2].append(r.prompt_tokens)
        c[3].append(r.output_tokens); c[4].append(r.instance)
        c[5].append(r.prefill_instance if r.prefill_instance >= 0 else r.instance)
        c[6].append(_NAN if r.scheduled_s is None else r.scheduled_s)
        c[7].append(_NAN if r.first_token_s is None else r.first_token_s)
        c[8].append(_NAN if r.finish_s is None else r.finish_s)
        c[9].append(r.preemptions); c[10].append(r.status); c[11].append(r.model_version)
        self.count += 1
        self.status_counts[r.status] += 1
        if len(c[0]) >= self._flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._cols[0]:
            return
        arrays = [pa.array(col, type=t) for col, (_, t) in zip(self._cols, _RAW)]
        arrival, first, finish = (np.asarray(self._cols[i], dtype=np.float64) for i in (1, 7, 8))
        out = np.asarray(self._cols[3], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (finish - first) / (out - 1), np.nan)
        arrays += [pa.array(first - arrival), pa.array(tpot), pa.array(finish - arrival)]
        table = pa.Table.from_arrays(arrays, schema=SCHEMA)
        if self.path is None:
            self._tables.append(table)
        else:
            if self._writer is None:
                self._tmp.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self._tmp, SCHEMA)
            self._writer.write_table(table)
        self._cols = [[] for _ in _RAW]

    def close(self) -> None:
        """Write what is buffered; the parquet file appears (atomically renamed) only now."""
        self._flush()
        if self.path is not None:
            if self._writer is None:
                self._tmp.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self._tmp, SCHEMA)
            self._writer.close()
            self._tmp.replace(self.path)

    def column(self, name: str) -> np.ndarray:
        """One column as numpy (read alone, so the summary never holds every column at once)."""
        if name == "status":
            raise ValueError("use status_is() for the status column")
        return self.read([name]).column(name).to_numpy(zero_copy_only=False)

    def status_is(self, status: str) -> np.ndarray:
        """Boolean mask of rows with this status (read dictionary-encoded: a byte per row, not a string)."""
        if self.path is None:
            col = self.read(["status"]).column("status")
        else:
            col = pq.read_table(self.path, columns=["status"], read_dictionary=["status"]).column("status")
        return pc.equal(col, status).to_numpy(zero_copy_only=False)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        if self.path is None:
            table = pa.concat_tables(self._tables) if self._tables else SCHEMA.empty_table()
            return table.select(columns) if columns else table
        return pq.read_table(self.path, columns=columns)

    def abandon(self) -> None:
        """A failed run: drop the partial file so nothing looks like a finished result."""
        if self._writer is not None:
            self._writer.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
