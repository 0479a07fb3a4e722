"""The ``workload`` group, read once: where the requests come from (a trace file, or Poisson / Gamma /
diurnal arrivals with fixed, empirical or log-normal lengths), the window, rate and count applied to them, and what happens to
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

KINDS = ("trace", "poisson", "gamma", "diurnal")
LENGTH_KINDS = ("fixed", "empirical", "lognormal")
_COMMON = ("kind", "rate_scale", "start_s", "end_s", "max_requests", "overlength")
_SYNTHETIC = ("rate_rps", "num_requests", "duration_s", "lengths")
KEYS = {"trace": _COMMON + ("path", "format", "chunksize"),
        "poisson": _COMMON + _SYNTHETIC,
        "gamma": _COMMON + _SYNTHETIC + ("cv",),
        "diurnal": _COMMON + _SYNTHETIC + ("amplitude", "period_s")}
#: the fixed and empirical kinds' keys: the shipped configs name all four, the kind not chosen with null
LENGTH_KEYS = ("kind", "prompt_tokens", "output_tokens", "path", "format")
#: the log-normal kind's keys (read only with kind: lognormal)
LOGNORMAL_KEYS = ("prompt_median", "prompt_sigma", "output_median", "output_sigma", "max_prompt_tokens",
                  "max_output_tokens")


@dataclass(frozen=True)
class LengthsConfig:
    """(prompt, output) lengths of synthetic requests: ``fixed`` (the two counts), ``empirical`` (pairs
    drawn from the trace ``path`` of ``format``) or ``lognormal`` (each drawn from a log-normal of ``*_median``
    and ``*_sigma``, clipped to ``max_*_tokens``)."""

    kind: str
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    path: str | None = None
    format: str | None = None
    prompt_median: float | None = None
    prompt_sigma: float | None = None
    output_median: float | None = None
    output_sigma: float | None = None
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None

    @classmethod
    def from_cfg(cls, node: Any, key_prefix: str = "workload.lengths") -> LengthsConfig:
        g = Group(node, key_prefix)
        kind = g.choice("kind", LENGTH_KINDS)
        if kind == "lognormal":
            g.check_known(("kind", *LOGNORMAL_KEYS), where=f" with {g.key('kind')}=lognormal")
            return cls(kind, prompt_median=g.float("prompt_median", gt=0), prompt_sigma=g.float("prompt_sigma", ge=0),
                       output_median=g.float("output_median", gt=0), output_sigma=g.float("output_sigma", ge=0),
                       max_prompt_tokens=g.int("max_prompt_tokens", min=1),
                       max_output_tokens=g.int("max_output_tokens", min=1))
        g.check_known(LENGTH_KEYS)
        if kind == "fixed":
            return cls(kind, prompt_tokens=g.int("prompt_tokens", min=1), output_tokens=g.int("output_tokens", min=1))
        return cls(kind, path=_path(g, "a trace file to draw (prompt, output) pairs from"),
                   format=g.choice("format", FORMATS))


@dataclass(frozen=True)
class WorkloadConfig:
    """One workload. Common: ``kind``, the window ``[start_s, end_s)`` on the source's own timeline,
    ``rate_scale`` (2.0: twice the request rate), ``max_requests``, ``overlength`` (``reject`` | ``clip``).
    ``trace``: ``path``, ``format``, ``chunksize``. ``poisson`` / ``gamma`` / ``diurnal``: ``rate_rps`` (the mean),
    ``cv`` (gamma), ``amplitude`` and ``period_s`` (diurnal),
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
    amplitude: float | None = None     # diurnal: the rate swings between (1 -/+ amplitude) x rate_rps
    period_s: float | None = None      # diurnal: one "day", time-compressed

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
        diurnal = {}
        if kind == "diurnal":
            diurnal = {"amplitude": g.fraction("amplitude", "[0, 1)"), "period_s": g.float("period_s", gt=0)}
        return cls(**common, **diurnal, rate_rps=g.float("rate_rps", gt=0),
                   cv=g.float("cv", gt=0) if kind == "gamma" else None,
                   num_requests=g.int("num_requests", min=1, optional=True, default=None),
                   duration_s=g.float("duration_s", gt=0, optional=True, default=None),
                   lengths=LengthsConfig.from_cfg(g.raw("lengths"), g.key("lengths")))


def _path(g: Group, what: str) -> str:
    if g.raw("path", None) is None:
        raise ConfigError(f"{g.key('path')} must be set: {what}")
    return g.str("path")
