"""The measurement grids: picking the profile's grids from the config and checking them.

``conf/calibrate.yaml`` holds one set of grids per *profile* (``cpu``: small enough for the tiny model
to calibrate in about a minute on two cores; ``gpu``: for 7-8B models on an 80 GB GPU). ``profile:
auto`` picks ``cpu`` for ``device=cpu`` and ``gpu`` for ``device=cuda``. Each table's measurer turns
its grid into points; this module only reads and checks the lists, with messages that name the key.
"""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from simcolo.errors import ConfigError


def select_grids(cfg: DictConfig, device: str) -> tuple[str, dict[str, Any]]:
    """The profile name and its grids as plain Python containers."""
    profile = cfg.profile
    if profile in (None, "auto"):
        profile = "cpu" if device == "cpu" else "gpu"
    if profile not in cfg.grids:
        raise ConfigError(f"profile={profile!r}: no grids.{profile} in conf/calibrate.yaml; "
                          f"known profiles: {sorted(cfg.grids)} (or auto)")
    return str(profile), OmegaConf.to_container(cfg.grids[profile], resolve=True)


def table_grid(grids: Mapping[str, Any], profile: str, table: str) -> dict[str, Any]:
    if table not in grids or not isinstance(grids[table], Mapping):
        raise ConfigError(f"grids.{profile}.{table}: missing; expected a mapping of axis -> list of values")
    return dict(grids[table])


def axis(grid: Mapping[str, Any], where: str, name: str, *, min_len: int = 1,
         kind: type = int, positive: bool = True) -> list:
    """``grid[name]`` as a sorted list of distinct values of ``kind`` (ints > 0 by default)."""
    if name not in grid:
        raise ConfigError(f"{where}.{name}: missing; expected a list of values")
    values = grid[name]
    if not isinstance(values, (list, tuple)):
        values = [values]
    out = []
    for v in values:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and kind is int:
            ok = float(v) == int(v)
        if not ok or (positive and v <= 0):
            what = "positive integers" if kind is int else "positive numbers"
            raise ConfigError(f"{where}.{name}: {v!r} is not valid; expected a list of {what}")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}.{name}: {values} repeats a value")
    if len(out) < min_len:
        raise ConfigError(f"{where}.{name}: {values} has {len(out)} value(s); at least {min_len} needed "
                          "(interpolation needs two per axis)")
    return sorted(out)


def scalar(grid: Mapping[str, Any], where: str, name: str, kind: type = int):
    if name not in grid:
        raise ConfigError(f"{where}.{name}: missing")
    v = grid[name]
    try:
        if isinstance(v, bool) or (kind is int and float(v) != int(v)):
            raise ValueError
        return kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{name}: {v!r} is not a valid {kind.__name__}") from None
