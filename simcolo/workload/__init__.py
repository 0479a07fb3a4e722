"""Request streams for the simulator: real traces (Azure, Mooncake, BurstGPT, plain CSV) and synthetic
arrivals (Poisson, Gamma), with time windows, rate scaling and requests longer than the model's context refused or clipped
(``workload.overlength``).

Entry point: ``build_workload(cfg, max_context_len=..., rng=...)`` -> an iterable of ``Request``.
"""
from simcolo.workload.build import build_workload
from simcolo.workload.loaders import FORMATS, read_trace
from simcolo.workload.request import Request
from simcolo.workload.workload import Workload, WorkloadStats

__all__ = ["FORMATS", "Request", "Workload", "WorkloadStats", "build_workload", "read_trace"]
