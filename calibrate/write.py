"""Turning the measured points into a cost-table directory (``simcolo/costs/FORMAT.md``).

* ``prefill`` and ``decode`` must be full rectangular grids. A point that was skipped (it did not fit
  in memory) leaves a hole; the grid row or column with the largest share of holes is then dropped
  (the larger value on a tie) until none is left, and each drop is recorded in ``skipped``. Fewer
  than two values left on an axis is an error that lists the skipped points.
* The other tables are written as measured, in the column order of ``schema.RESERVED_COLUMNS``.
* Files go through ``simcolo.costs.tables.write_table_dir``: metadata validated first, every file
  written atomically, JSON with sorted keys. Latencies keep 7 significant digits (``%.6e``).
"""
from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch

from calibrate.context import CalibrationError
from simcolo.costs.schema import DECODE, PREFILL, RESERVED_COLUMNS, SCHEMA_VERSION
from simcolo.costs.tables import write_table_dir

GRID_TABLES = {PREFILL.name: PREFILL.keys, DECODE.name: DECODE.keys}
GRID_COLUMNS = ("latency_s", "latency_std_s", "repeats", "peak_memory_bytes")
INT_COLUMNS = {"batch_tokens", "num_seqs", "batch_size", "kv_tokens_per_seq", "num_stages", "stage",
               "num_layers", "micro_batch", "seq_len", "rank", "trainable_params", "repeats",
               "peak_memory_bytes", "size", "bytes", "num_tensors", "a_x", "a_y", "b_micro_batch",
               "b_seq_len", "step", "distribution"}


def columns_of(table: str) -> tuple[str, ...]:
    if table in GRID_TABLES:
        return (*GRID_TABLES[table], *GRID_COLUMNS)
    return RESERVED_COLUMNS[table]


# ------------------------------------------------------------------------------- full grids

def complete_grid(table: str, requested: list[dict], rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of the largest full grid the measurements allow (greedy), and the dropped lines."""
    ka, kb = GRID_TABLES[table]
    axes = [sorted({p[ka] for p in requested}), sorted({p[kb] for p in requested})]
    have = {(r[ka], r[kb]) for r in rows}
    dropped = []
    while True:
        holes = [(a, b) for a in axes[0] for b in axes[1] if (a, b) not in have]
        if not holes:
            break
        best = max(((sum(h[i] == v for h in holes) / len(axes[1 - i]), v, i) for i in (0, 1) for v in axes[i]))
        _, value, i = best
        key = (ka, kb)[i]
        n = sum(h[i] == value for h in holes)
        axes[i].remove(value)
        dropped.append({"table": table, "point": {key: value},
                        "reason": f"{key}={value} dropped so that the table stays a full grid: "
                                  f"{n} of its points were skipped"})
        if len(axes[i]) < 2:
            raise CalibrationError(
                f"table '{table}': after dropping the grid lines with skipped points only {axes[i]} "
                f"remain on axis '{key}'; at least 2 values are needed. Skipped points: "
                f"{[h for h in holes][:8]} -- lower the grid (grids.<profile>.{table}) or raise "
                "max_memory_bytes")
    keep = {(a, b) for a in axes[0] for b in axes[1]}
    return [r for r in rows if (r[ka], r[kb]) in keep], dropped


# ------------------------------------------------------------------------------- CSV

SORT_KEYS = {
    "prefill": PREFILL.keys, "decode": DECODE.keys,
    "train_stage": ("num_stages", "stage", "micro_batch", "seq_len", "phase"),
    "lora_step": ("rank", "micro_batch", "seq_len", "phase"),
    "transfer": ("link", "payload", "size"),
    "interference": ("kind_a", "a_x", "a_y", "kind_b", "b_micro_batch", "b_seq_len", "method", "sm_share_a"),
    "learning_curve": ("step",),
}


def table_csv(table: str, rows: Iterable[dict]) -> str:
    """CSV text of a table: its columns in the fixed order, integer columns as integers, floats ``%.6e``."""
    cols = list(columns_of(table))
    df = pd.DataFrame(list(rows), columns=cols)
    for c in cols:
        if c in INT_COLUMNS:
            df[c] = df[c].astype("int64")
    df = df.sort_values(list(SORT_KEYS[table]), kind="stable")
    return df.to_csv(index=False, float_format="%.6e", lineterminator="\n")


# ------------------------------------------------------------------------------- metadata

def environment(device: torch.device) -> dict[str, Any]:
    env = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
           "cuda": torch.version.cuda, "driver": None, "device_name": _cpu_name()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_bytes=int(props.total_memory),
                   sm_count=props.multi_processor_count, driver=_nvidia_driver(),
                   cudnn=torch.backends.cudnn.version())
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_calibration(out: Path, tables: dict[str, list[dict]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``tables`` (name -> rows) and the metadata (without ``tables``/``schema_version``)."""
    files = {f"{name}.csv": table_csv(name, rows) for name, rows in tables.items() if rows}
    metadata = {**meta, "schema_version": SCHEMA_VERSION, "source": "measured",
                "tables": {name: f"{name}.csv" for name, rows in tables.items() if rows}}
    write_table_dir(out, metadata, files)
    return metadata
