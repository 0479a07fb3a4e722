"""The ``workload`` group, read once: where the requests come from (a trace file, or Poisson / Gamma
arrivals with fixed or empirical lengths), the window, rate and count applied to them, and what happens to
a request longer than the model's context (``overlength``). Files are opened when the workload is built
(``simcolo.workload.build_workload``), not here.

The keys a workload reads depend on its ``kind``; any other key is refused (``+workload.rate_rps=3`` on a
trace is not read by anything).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simcolo.config.read import Group
from simcolo.errors import ConfigError
from simcolo.workload.loaders import CHUNKSIZE, FORMATS
from simcolo.workload.overlength import MODES as OVERLENGTH_MODES

KINDS = ("trace", "poisson", "gamma")
LENGTH_KINDS = ("fixed", "empirical")
_COMMON = ("kind", "rate_scale", "start_s", "end_s", "max_requests", "overlength")
_SYNTHETIC = ("rate_rps", "num_requests", "duration_s", "lengths")
KEYS = {"trace": _COMMON + ("path", "format", "chunksize"),
        "poisson": _COMMON + _SYNTHETIC,
        "gamma": _COMMON + _SYNTHETIC + ("cv",)}
#: both kinds' keys: the shipped configs name all four, the kind not chosen with null
LENGTH_KEYS = ("kind", "prompt_tokens", "output_tokens", "path", "format")


@dataclass(frozen=True)
class LengthsConfig:
    """(prompt, output) lengths of synthetic requests: ``fixed`` (the two counts) or ``empirical`` (pairs
    drawn from the trace ``path`` of ``format``)."""

    kind: str
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    path: str | None = None
    format: str | None = None

    @classmethod
    def from_cfg(cls, node: Any, key_prefix: str = "workload.lengths") -> LengthsConfig:
        g = Group(node, key_prefix)
        g.check_known(LENGTH_KEYS)
        kind = g.choice("kind", LENGTH_KINDS)
        if kind == "fixed":
            return cls(kind, prompt_tokens=g.int("prompt_tokens", min=1), output_tokens=g.int("output_tokens", min=1))
        return cls(kind, path=_path(g, "a trace file to draw (prompt, output) pairs from"),
                   format=g.choice("format", FORMATS))


@dataclass(frozen=True)
class WorkloadConfig:
    """One workload. Common: ``kind``, the window ``[start_s, end_s)`` on the source's own timeline,
    ``rate_scale`` (2.0: twice the request rate), ``max_requests``, ``overlength`` (``reject`` | ``clip``).
    ``trace``: ``path``, ``format``, ``chunksize``. ``poisson`` / ``gamma``: ``rate_rps``, ``cv`` (gamma),
    ``num_requests`` / ``duration_s`` (bounds of the generated stream, before the window and rate;
    neither: unbounded), ``lengths``."""

    kind: str
    rate_scale: float = 1.0
    start_s: float | None = None
    end_s: float | None = None
    max_requests: int | None = None
    overlength: str = "reject"
    path: str | None = None
    format: str | None = None
    chunksize: int = CHUNKSIZE
    rate_rps: float | None = None
    cv: float | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    lengths: LengthsConfig | None = None

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "workload") -> WorkloadConfig:
        """Optional keys may be absent (a plain dict with ``kind`` and a source is a workload)."""
        g = Group(node, key_prefix)
        kind = g.choice("kind", KINDS)
        g.check_known(KEYS[kind], where=f" with {g.key('kind')}={kind}")
        start_s = g.float("start_s", ge=0, optional=True, default=None)
        end_s = g.float("end_s", ge=0, optional=True, default=None)
        if start_s is not None and end_s is not None and end_s <= start_s:
            raise ConfigError(f"{g.key('end_s')}={end_s:g} must be greater than {g.key('start_s')}={start_s:g}")
        common = {"kind": kind, "rate_scale": g.float("rate_scale", gt=0, default=1.0), "start_s": start_s,
                  "end_s": end_s, "max_requests": g.int("max_requests", min=1, optional=True, default=None),
                  "overlength": g.choice("overlength", OVERLENGTH_MODES, default="reject")}
        if kind == "trace":
            return cls(**common, path=_path(g, "the trace file to read"), format=g.choice("format", FORMATS),
                       chunksize=g.int("chunksize", min=1, default=CHUNKSIZE))
        return cls(**common, rate_rps=g.float("rate_rps", gt=0),
                   cv=g.float("cv", gt=0) if kind == "gamma" else None,
                   num_requests=g.int("num_requests", min=1, optional=True, default=None),
                   duration_s=g.float("duration_s", gt=0, optional=True, default=None),
                   lengths=LengthsConfig.from_cfg(g.raw("lengths"), g.key("lengths")))


def _path(g: Group, what: str) -> str:
    if g.raw("path", None) is None:
        raise ConfigError(f"{g.key('path')} must be set: {what}")
    return g.str("path")
