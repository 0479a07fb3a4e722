"""What a cost-table directory must contain (schema version 1). FORMAT.md is the prose version.

This module only *describes* the format and checks metadata; reading and grid validation of the
table files live in ``tables.py`` so that both the roofline generator and calibrate/ can share them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Mapping

from simcolo.errors import TableError

SCHEMA_VERSION = 1
METADATA_FILE = "metadata.json"
SOURCES = ("roofline", "measured")
TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class TableSpec:
    """A table that is a full rectangular grid over two integer key columns with one latency column.

    ``keys`` are (row axis, column axis) of the grid; ``value`` is the interpolated column;
    ``optional`` columns may be present and are checked to be finite and non-negative.
    """

    name: str
    keys: tuple[str, str]
    value: str
    optional: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.keys, self.value)


PREFILL = TableSpec("prefill", ("batch_tokens", "num_seqs"), "latency_s", ("latency_std_s", "repeats"))
DECODE = TableSpec("decode", ("batch_size", "kv_tokens_per_seq"), "latency_s", ("latency_std_s", "repeats"))

REQUIRED_TABLES: dict[str, TableSpec] = {PREFILL.name: PREFILL, DECODE.name: DECODE}

#: Tables calibrate/ writes beside the required ones. Their names are accepted in ``metadata.json``
#: (the file must exist); ``CostModel.load`` does not parse them. Their columns, in the order calibrate/
#: writes them, are fixed here and documented in FORMAT.md. ``train_stage``, ``lora_step`` and
#: ``interference`` are also written by the roofline generator and read (and validated) by
#: ``TrainingCosts`` (training_costs.py) and ``InterferenceTable`` (interference_table.py).
RESERVED_COLUMNS: dict[str, tuple[str, ...]] = {
    "train_stage": ("num_stages", "stage", "num_layers", "micro_batch", "seq_len", "phase", "latency_s",
                    "latency_std_s", "repeats", "peak_memory_bytes"),
    "lora_step": ("rank", "micro_batch", "seq_len", "phase", "num_layers", "trainable_params", "latency_s",
                  "latency_std_s", "repeats", "peak_memory_bytes"),
    "interference": ("kind_a", "a_x", "a_y", "kind_b", "b_micro_batch", "b_seq_len", "method", "sm_share_a",
                     "sm_share_a_actual", "sm_share_b", "latency_a_alone_s", "latency_b_alone_s",
                     "latency_a_s", "latency_b_s", "slowdown_a", "slowdown_b", "repeats"),
    "transfer": ("link", "payload", "size", "bytes", "num_tensors", "latency_s", "latency_std_s", "repeats",
                 "bandwidth_bytes_per_s"),
    "learning_curve": ("step", "loss", "distribution"),
}
RESERVED_TABLES: tuple[str, ...] = tuple(RESERVED_COLUMNS)

#: The reserved tables the simulator reads (every roofline directory has them).
SIMULATOR_TABLES: tuple[str, ...] = ("train_stage", "lora_step", "interference")
#: Values of ``phase`` in ``train_stage`` and ``lora_step``.
TRAINING_PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")
#: Values of ``kind_a``, ``kind_b`` and ``method`` in ``interference``.
INTERFERENCE_KINDS_A: tuple[str, ...] = ("prefill", "decode")
INTERFERENCE_KINDS_B: tuple[str, ...] = ("train", "lora")
INTERFERENCE_METHODS: tuple[str, ...] = ("streams", "green_context")

#: metadata.json keys that must be present. Extra keys are allowed (e.g. ``roofline_params``).
METADATA_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "source": str,
    "gpu": str,
    "model": str,
    "tp": int,
    "dtype": str,
    "created": str,
    "model_config": dict,
    "gpu_spec": dict,
    "method": str,
    "tables": dict,
}


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The decoder layers of pipeline stage ``stage`` of ``num_stages`` in ``train_stage`` and of the
    engine's stage models (``simcolo.engine.model.stage_layers``) -- contiguous, as even as possible, the first ``num_layers %
    num_stages`` stages holding one layer more."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages {num_stages} must be within [1, {num_layers}] (the model's layers)")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} must be within [0, {num_stages})")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def table_dir_name(gpu: str, model: str, tp: int) -> str:
    """``<gpu>__<model>__tp<N>``, e.g. ``h100-sxm__llama3-8b__tp1``."""
    return f"{gpu}__{model}__tp{tp}"


def parse_table_dir_name(name: str) -> tuple[str, str, int] | None:
    """Inverse of :func:`table_dir_name`; ``None`` if ``name`` does not have that shape."""
    parts = name.split("__")
    if len(parts) != 3 or not parts[2].startswith("tp") or not parts[2][2:].isdigit():
        return None
    return parts[0], parts[1], int(parts[2][2:])


def validate_metadata(meta: Any, where: Path) -> None:
    """Check ``metadata.json`` content; ``where`` is the file, named in every message."""
    if not isinstance(meta, dict):
        raise TableError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    # The version goes first: a file of another version may legitimately lack or rename other keys.
    if "schema_version" not in meta:
        raise TableError(f"{where}: missing key 'schema_version' "
                         f"(this simcolo reads version {SCHEMA_VERSION})")
    version = meta["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise TableError(f"{where}: written by schema version {version!r}, "
                         f"this simcolo reads version {SCHEMA_VERSION}")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise TableError(f"{where}: missing key(s) {missing}; required keys: {list(METADATA_KEYS)}")
    for key, typ in METADATA_KEYS.items():
        value = meta[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise TableError(f"{where}: key '{key}' = {value!r} should be a JSON "
                             f"{'integer' if typ is int else 'string' if typ is str else 'object'}")
    if meta["source"] not in SOURCES:
        raise TableError(f"{where}: key 'source' = {meta['source']!r}, expected one of {list(SOURCES)}")
    if meta["tp"] < 1:
        raise TableError(f"{where}: key 'tp' = {meta['tp']} must be >= 1")
    try:
        datetime.fromisoformat(meta["created"])
    except ValueError:
        try:
            date.fromisoformat(meta["created"])
        except ValueError:
            raise TableError(f"{where}: key 'created' = {meta['created']!r} is not an ISO date "
                             "(e.g. 2026-01-31 or 2026-01-31T12:00:00)") from None
    validate_table_entries(meta["tables"], where)


def validate_table_entries(tables: Mapping[str, Any], where: Path) -> None:
    known = [*REQUIRED_TABLES, *RESERVED_TABLES]
    for name, file in tables.items():
        if name not in known:
            raise TableError(f"{where}: 'tables' names unknown table '{name}'; known tables: {known}")
        if not isinstance(file, str) or Path(file).name != file or Path(file).suffix not in TABLE_SUFFIXES:
            raise TableError(f"{where}: 'tables.{name}' = {file!r} should be a file name in the same "
                             f"directory ending in {' or '.join(TABLE_SUFFIXES)}")
    missing = [name for name in REQUIRED_TABLES if name not in tables]
    if missing:
        raise TableError(f"{where}: 'tables' lacks required table(s) {missing} "
                         f"(required: {list(REQUIRED_TABLES)})")
