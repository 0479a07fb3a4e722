"""One live replay: build the backend, feed the trace in real time, write the simulator's outputs.

Requests are dispatched by the main thread at their arrival times on the wall clock (``workload``
options scale and cut the trace exactly as in a simulation: ``rate_scale``, ``start_s``/``end_s``,
``max_requests``). The replay ends when every request is done (or at ``sim.max_time_s``); training
stops with it. If a thread fails (a CUDA out-of-memory, a kernel error), the replay stops at once,
every record so far is written, in-flight requests are recorded with status ``replay_failed`` and the
rest of the trace with ``not_replayed``, and :class:`ReplayFailed` is raised naming the failure.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simcolo.config.run import RunConfig
from simcolo.errors import ConfigError, SimcoloError
from simcolo.hardware.cluster import Topology
from simcolo.layout.plan import plan_layout
from simcolo.metrics.outputs import RunResult, run_summary, write_outputs
from simcolo.metrics.records import RequestSink
from simcolo.policies import make_policy
from simcolo.replay.backend import LiveBackend, check_live, torch_device
from simcolo.replay.timeline import LiveTimeline
from simcolo.workload import build_workload


class ReplayFailed(SimcoloError):
    """A live replay stopped on an error; its records up to then are written."""

    exit_code = 3   # python -m simcolo.replay's exit status (a config error exits 2)


def replay(cfg, out_dir: str | Path | None = None) -> RunResult:
    """Run the live replay described by ``cfg`` (the composed Hydra config with ``device`` and
    ``replay`` keys, or its ``RunConfig``) and write ``requests.parquet``, ``training.parquet``,
    ``gpus.parquet``, ``summary.json`` and ``plots/`` to ``out_dir`` (the same files as a simulation)."""
    wall0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    run = cfg if isinstance(cfg, RunConfig) else RunConfig.from_cfg(cfg)
    if run.replay is None:
        raise ConfigError("the replay needs its keys (device, replay.*): load the config named 'replay'")
    device = torch_device(run.replay.device)
    if device.type == "cpu":
        torch.set_num_threads(run.replay.cpu_threads)
    # A thread waiting for the GIL (an arrival due, a co-located trainer) gets it within the holder's
    # switch interval; the CPU interference table is measured with Python's default (0.005 s).
    switch = sys.getswitchinterval()
    if run.replay.gil_switch_interval_s is not None:
        sys.setswitchinterval(run.replay.gil_switch_interval_s)
    try:
        return _replay(run, out_dir, device, wall0)
    finally:
        sys.setswitchinterval(switch)


def _replay(run: RunConfig, out_dir: Path | None, device: torch.device, wall0: float) -> RunResult:
    seed = run.seed
    torch.manual_seed(seed)
    policy = make_policy(run.policy, np.random.default_rng([seed, 2]))
    sink = RequestSink(out_dir / "requests.parquet" if out_dir else None)
    try:
        check_live(run, policy)
        plan = plan_layout(run, policy, Topology.from_config(run.gpu, run.cluster))
        backend = LiveBackend(run, policy, plan, sink, device)
        workload = build_workload(run.workload, max_context_len=run.model.max_context_len,
                                  rng=np.random.default_rng(seed))
        backend.build()
        backend.warm_up(run.replay.warmup_iterations)
    except BaseException:
        sink.abandon()
        raise
    live, system, clock = backend.live, backend.system, backend.clock
    timeline = LiveTimeline(backend, run.metrics.timeline_interval_s)
    wake = clock.wake = live.condition()
    backend.on_request_done = wake.notify
    max_time = math.inf if run.sim.max_time_s is None else run.sim.max_time_s
    requests = iter(workload)
    backend.start()
    try:
        with wake:
            r = next(requests, None)
            while not live.stopped:
                now = live.now
                timeline.sample_due(now)
                clock.run_due(now)
                if now >= max_time:
                    break
                if r is not None and r.arrival_s <= now:
                    backend.on_request_arrival()
                    system.dispatch(r)
                    r = next(requests, None)
                    continue
                if r is None and system.done == system.arrived:
                    break
                due = min(timeline.next_s, max_time, clock.next_due(),
                          r.arrival_s if r is not None else now + 1.0)
                wake.wait(max(0.0, due - now))
        pending = r
        end_s = live.now
        stuck = backend.stop()
        timeline.sample(end_s)
        status = "replay_failed" if live.failure else "unfinished_at_end"
        with live.lock:
            for r in system.in_flight():
                r.status = status
                sink(r)
            rest = ([pending] if pending is not None else []) + list(requests)
            for r in rest:
                r.status = "not_replayed" if live.failure else "not_arrived_before_end"
                sink(r)
        sink.close()
    except BaseException:
        backend.stop(5.0)
        sink.close()
        raise
    summary = run_summary(run, backend, sink, backend.itl, workload)
    summary.update(backend.kernel_time_ratios())
    summary.update({"backend": "replay", "replay_device": _device_text(device),
                    "replay_torch": torch.__version__, "replay_host": platform.node(),
                    "replay_wall_s": time.perf_counter() - wall0, "replay_end_s": end_s,
                    "replay_failed": live.failure or "", "replay_threads_still_running": ", ".join(stuck)})
    result = RunResult(summary, sink, timeline.frame(), system, time.perf_counter() - wall0, out_dir,
                       training=backend.training_frame(), backend=backend)
    if out_dir is not None:
        result.plots = write_outputs(out_dir, run.metrics.plots, result,
                                     f"({run.model.name}, {run.policy_name}, replay on {device})",
                                     {"iterations": backend.iterations_frame()})
    if live.failure:
        where = f"; records so far are in {out_dir}" if out_dir is not None else ""
        raise ReplayFailed(f"replay stopped: {live.failure}{where}") from live.failure_exc
    return result


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
