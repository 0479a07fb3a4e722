"""``build_workload``: the Hydra ``workload`` config node to a lazy :class:`Workload`.

Every config error is a :class:`ConfigError` naming the key (``workload.rate_scale``) and what was
expected. Files are checked here (existence, header), so a bad path fails before the run starts.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from simcolo.errors import ConfigError
from simcolo.paths import resolve_path
from simcolo.workload.loaders import CHUNKSIZE, FORMATS, check_trace, read_trace
from simcolo.workload.synthetic import (
    EmpiricalLengths, FixedLengths, GammaArrivals, PoissonArrivals, synthetic_chunks,
)
from simcolo.workload.workload import Transform, Workload

KINDS = ("trace", "poisson", "gamma")
_COMMON = ("kind", "rate_scale", "start_s", "end_s", "max_requests")
_TRACE = ("path", "format", "chunksize")
_SYNTHETIC = ("rate_rps", "cv", "num_requests", "duration_s", "lengths")
_LENGTHS = ("kind", "prompt_tokens", "output_tokens", "path", "format")


class _Keys:
    """Typed reads from one config node; errors name the full key."""

    def __init__(self, node: Any, prefix: str, allowed: tuple[str, ...]):
        self.prefix = prefix
        self.data = _plain(node, prefix)
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise ConfigError(f"{prefix}: unknown key(s) {unknown}; expected keys among {list(allowed)}")

    def raw(self, key: str):
        value = self.data.get(key)
        return None if value == "???" else value     # Hydra's MISSING, if not resolved

    def _fail(self, key: str, expected: str):
        return ConfigError(f"{self.prefix}.{key} = {self.raw(key)!r}; expected {expected}")

    def required(self, key: str, what: str):
        value = self.raw(key)
        if value is None:
            raise ConfigError(f"{self.prefix}.{key} must be set ({what})")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.required(key, f"one of {list(options)}")
        if value not in options:
            raise self._fail(key, f"one of {list(options)}")
        return value

    def number(self, key: str, *, required: bool = False, positive: bool = False, default=None) -> float | None:
        value = self.raw(key)
        expected = "a number > 0" if positive else "a number >= 0"
        if value is None:
            if required:
                raise ConfigError(f"{self.prefix}.{key} must be set ({expected})")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise self._fail(key, expected)
        if value < 0 or (positive and value == 0):
            raise self._fail(key, expected)
        return float(value)

    def count(self, key: str, *, required: bool = False, default=None) -> int | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.prefix}.{key} must be set (an integer >= 1)")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise self._fail(key, "an integer >= 1")
        return int(value)


def _plain(node: Any, where: str) -> dict:
    """A plain dict from an omegaconf DictConfig or any Mapping (interpolations resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        DictConfig = None
    if DictConfig is not None and isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return dict(node)
    raise ConfigError(f"{where}: expected a mapping, got {type(node).__name__}")


def _transform(keys: _Keys, max_context_len: int) -> Transform:
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, (int, np.integer)) or max_context_len < 2:
        raise ConfigError(f"max_context_len = {max_context_len!r}; expected an integer >= 2 (a prompt token and an output token)")
    start_s, end_s = keys.number("start_s"), keys.number("end_s")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise ConfigError(f"workload.end_s = {end_s} must be greater than workload.start_s = {start_s}")
    return Transform(
        max_context_len=int(max_context_len),
        rate_scale=keys.number("rate_scale", positive=True, default=1.0),
        start_s=start_s,
        end_s=end_s,
        max_requests=keys.count("max_requests"),
    )


def _trace_source(keys: _Keys):
    path_value = keys.required("path", "a trace file")
    fmt = keys.choice("format", FORMATS)
    chunksize = keys.count("chunksize", default=CHUNKSIZE)
    path = check_trace(resolve_path(str(path_value)), fmt)
    return (lambda: read_trace(path, fmt, chunksize)), f"{fmt} trace {path_value}"


def _lengths(node: Any):
    keys = _Keys(node, "workload.lengths", _LENGTHS)
    kind = keys.choice("kind", ("fixed", "empirical"))
    if kind == "fixed":
        return FixedLengths(keys.count("prompt_tokens", required=True), keys.count("output_tokens", required=True))
    path_value = keys.required("path", "a trace file to sample (prompt, output) pairs from")
    fmt = keys.choice("format", FORMATS)
    return EmpiricalLengths.from_trace(resolve_path(str(path_value)), fmt, f"{fmt} trace {path_value}")


def _private_rng(rng: np.random.Generator) -> np.random.Generator:
    """A child generator of ``rng``, so the workload's draws do not shift anyone else's."""
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    try:
        return rng.spawn(1)[0]
    except (AttributeError, TypeError):   # a bit generator not seeded from a SeedSequence
        return np.random.default_rng(int(rng.integers(2**63)))


def _synthetic_source(keys: _Keys, kind: str, rng: np.random.Generator):
    rate = keys.number("rate_rps", required=True, positive=True)
    arrivals = PoissonArrivals(rate) if kind == "poisson" else GammaArrivals(rate, keys.number("cv", required=True, positive=True))
    lengths_node = keys.raw("lengths")
    if lengths_node is None:
        raise ConfigError("workload.lengths must be set ({kind: fixed|empirical, ...})")
    lengths = _lengths(lengths_node)
    num_requests = keys.count("num_requests")
    duration_s = keys.number("duration_s", positive=True)
    child = _private_rng(rng)

    def chunks():
        return synthetic_chunks(arrivals, lengths, child, num_requests=num_requests, duration_s=duration_s)

    return chunks, f"{arrivals}; {lengths}"


def build_workload(cfg: Mapping, *, max_context_len: int, rng: np.random.Generator) -> Workload:
    """Build the workload described by the ``workload`` config node.

    ``cfg`` keys — common: ``kind`` (trace|poisson|gamma), ``rate_scale``, ``start_s``, ``end_s``,
    ``max_requests``; trace: ``path``, ``format`` (azure|mooncake|burstgpt|csv), ``chunksize``;
    synthetic: ``rate_rps``, ``cv`` (gamma), ``num_requests``, ``duration_s``, ``lengths``.
    Synthetic ``num_requests``/``duration_s`` bound the generated stream before the transformations
    (so ``duration_s`` is on the unscaled timeline); with neither set the stream is unbounded.
    """
    keys = _Keys(cfg, "workload", _COMMON + _TRACE + _SYNTHETIC)
    kind = keys.choice("kind", KINDS)
    transform = _transform(keys, max_context_len)
    if kind == "trace":
        chunks, source = _trace_source(keys)
    else:
        chunks, source = _synthetic_source(keys, kind, rng)
    return Workload(chunks, transform, source)
