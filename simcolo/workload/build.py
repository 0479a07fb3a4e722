"""``build_workload``: the workload config (``simcolo.config.workload.WorkloadConfig``) to a lazy
:class:`Workload`.

The config is read (and every value checked, naming its key) by ``WorkloadConfig``; here the sources are
opened. Files are checked here (existence, header, a file of another known format), so a bad path fails
before the run starts.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from simcolo.errors import ConfigError
from simcolo.paths import resolve_path
from simcolo.workload.loaders import check_trace, read_trace
from simcolo.workload.synthetic import (DiurnalArrivals, EmpiricalLengths, FixedLengths, GammaArrivals, LogNormalLengths,
                                        PoissonArrivals, synthetic_chunks)
from simcolo.workload.workload import Transform, Workload

if TYPE_CHECKING:
    from simcolo.config.workload import LengthsConfig, WorkloadConfig


def _transform(cfg: WorkloadConfig, max_context_len: int) -> Transform:
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, (int, np.integer)) or max_context_len < 2:
        raise ConfigError(f"max_context_len = {max_context_len!r}; expected an integer >= 2 (a prompt token and an output token)")
    return Transform(max_context_len=int(max_context_len), rate_scale=cfg.rate_scale, start_s=cfg.start_s,
                     end_s=cfg.end_s, max_requests=cfg.max_requests, overlength=cfg.overlength)


def _trace_source(cfg: WorkloadConfig):
    path = check_trace(resolve_path(cfg.path), cfg.format, "workload.format")
    fmt, chunksize = cfg.format, cfg.chunksize
    return (lambda: read_trace(path, fmt, chunksize)), f"{fmt} trace {cfg.path}"


def _lengths(cfg: LengthsConfig):
    if cfg.kind == "fixed":
        return FixedLengths(cfg.prompt_tokens, cfg.output_tokens)
    if cfg.kind == "lognormal":
        return LogNormalLengths(cfg.prompt_median, cfg.prompt_sigma, cfg.output_median, cfg.output_sigma,
                                cfg.max_prompt_tokens, cfg.max_output_tokens)
    path = check_trace(resolve_path(cfg.path), cfg.format, "workload.lengths.format")
    return EmpiricalLengths.from_trace(path, cfg.format, f"{cfg.format} trace {cfg.path}")


def _private_rng(rng: np.random.Generator) -> np.random.Generator:
    """A child generator of ``rng``, so the workload's draws do not shift anyone else's."""
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    try:
        return rng.spawn(1)[0]
    except (AttributeError, TypeError):   # a bit generator not seeded from a SeedSequence
        return np.random.default_rng(int(rng.integers(2**63)))


def _synthetic_source(cfg: WorkloadConfig, rng: np.random.Generator):
    if cfg.kind == "poisson":
        arrivals = PoissonArrivals(cfg.rate_rps)
    elif cfg.kind == "gamma":
        arrivals = GammaArrivals(cfg.rate_rps, cfg.cv)
    else:
        arrivals = DiurnalArrivals(cfg.rate_rps, cfg.amplitude, cfg.period_s)
    lengths = _lengths(cfg.lengths)
    child = _private_rng(rng)

    def chunks():
        return synthetic_chunks(arrivals, lengths, child, num_requests=cfg.num_requests, duration_s=cfg.duration_s)

    return chunks, f"{arrivals}; {lengths}"


def build_workload(cfg: WorkloadConfig | Mapping[str, Any], *, max_context_len: int,
                   rng: np.random.Generator) -> Workload:
    """Build the workload ``cfg`` describes (a ``WorkloadConfig``, or the ``workload`` node to read into one)
    for a model of ``max_context_len`` tokens; ``rng`` seeds synthetic arrivals and lengths."""
    # imported here: simcolo.config reads simcolo.workload's formats
    from simcolo.config.workload import WorkloadConfig

    if not isinstance(cfg, WorkloadConfig):
        cfg = WorkloadConfig.from_cfg(cfg)
    transform = _transform(cfg, max_context_len)
    chunks, source = _trace_source(cfg) if cfg.kind == "trace" else _synthetic_source(cfg, rng)
    return Workload(chunks, transform, source)
