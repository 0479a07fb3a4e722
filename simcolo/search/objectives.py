"""What a search optimises: summary keys of a run, their direction, and how a plot labels them.

A job's objectives are read from its ``summary.json`` (the CLI's return value is the SLO attainment
alone); :func:`job_objectives` does that where the job ran, for the Hydra callbacks of
:mod:`simcolo.search.callbacks`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: key -> (axis label, unit, scale applied before plotting)
LABELS: dict[str, tuple[str, str, float]] = {
    "train_flops_per_s": ("training work, model FLOPs per second", "PFLOP/s", 1e-15),
    "train_mfu": ("training MFU of the GPUs that train", "fraction of peak BF16", 1.0),
    "train_tokens_per_s": ("training throughput", "tokens/s", 1.0),
    "slo_attainment": ("SLO attainment, requests meeting TTFT and TPOT SLOs", "fraction", 1.0),
    "goodput_rps": ("goodput (requests meeting the SLO per second)", "req/s", 1.0),
    "ttft_p99_s": ("TTFT p99", "s", 1.0),
    "tpot_p99_s": ("TPOT p99", "s", 1.0),
    "num_gpus": ("GPUs", "count", 1.0),
}

DIRECTIONS = ("maximize", "minimize")


def axis_label(key: str, direction: str, arrow: str = "") -> str:
    """``<what> [<unit>]`` and, below, ``higher is better`` (with ``arrow``) for a plot axis."""
    label, unit, _ = LABELS.get(key, (key, "", 1.0))
    better = "higher is better" if direction == "maximize" else "lower is better"
    return (f"{label} [{unit}]" if unit else label) + f"\n{better} {arrow}".rstrip()


def scale(key: str) -> float:
    return LABELS.get(key, (key, "", 1.0))[2]


def directions_of(raw: Any, n: int) -> list[str]:
    """The sweeper's ``direction`` (one string or a list) as ``n`` lowercase names."""
    if isinstance(raw, str):
        out = [raw]
    else:
        out = [str(getattr(d, "name", d)) for d in raw]
    out = [d.lower() for d in out]
    if len(out) != n or any(d not in DIRECTIONS for d in out):
        raise ValueError(f"hydra.sweeper.direction {out} must give one of {DIRECTIONS} per objective ({n})")
    return out


def read_summary(job_dir: str | Path) -> dict | None:
    path = Path(job_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def values(summary: dict, keys: Sequence[str]) -> list[float]:
    """The objectives of one run (NaN where the summary lacks a key or holds no number)."""
    out = []
    for k in keys:
        v = summary.get(k)
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def job_objectives(config, keys: Sequence[str]) -> list[float] | None:
    """The objectives of the job whose (full, with ``hydra``) config this is, from the ``summary.json`` in
    its output directory; None if the job wrote none."""
    summary = read_summary(str(config.hydra.runtime.output_dir))
    return None if summary is None else values(summary, keys)


def meets(summary: dict, slo_target: float, min_train_flops_per_s: float = 0.0) -> bool:
    """The run attains the SLO target and, with a training requirement, trains at least that fast."""
    slo = float(summary.get("slo_attainment", math.nan))
    train = float(summary.get("train_flops_per_s", 0.0) or 0.0)
    return slo >= slo_target and (min_train_flops_per_s <= 0 or train >= min_train_flops_per_s)
