"""One simulation run: read the config, plan the layout, build it on SimPy's clock, run, write the outputs.

The policy's layout (``simcolo.layout.plan``) is built by the simulated backend
(``simcolo.colocation.simulated.SimBackend``); a run with training ends when serving does.

This is the library entry point (tests and notebooks call ``simulate``); ``simcolo.cli`` wraps it
in a Hydra app.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from simcolo.colocation.simulated import SimBackend
from simcolo.config.run import RunConfig
from simcolo.hardware.cluster import Topology
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.layout.plan import plan_layout
from simcolo.metrics.itl import ITLHistogram
from simcolo.metrics.outputs import RunResult, run_summary, write_outputs
from simcolo.metrics.records import RequestSink
from simcolo.metrics.timeline import TimelineSampler
from simcolo.policies import make_policy
from simcolo.serving.arrivals import ArrivalFeed
from simcolo.workload import build_workload

__all__ = ["simulate", "RunResult"]


def simulate(cfg, out_dir: str | Path | None = None, progress: bool = False) -> RunResult:
    """Run the simulation described by ``cfg`` (the composed Hydra config, or a ``RunConfig``).

    With ``out_dir`` it writes ``requests.parquet``, ``gpus.parquet``, ``summary.json`` and
    ``plots/*.png`` there (each atomically; on error nothing that looks finished is left).
    ``progress`` shows a tqdm bar of finished requests and simulated time.
    """
    wall0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    run = cfg if isinstance(cfg, RunConfig) else RunConfig.from_cfg(cfg)
    seed = run.seed
    policy = make_policy(run.policy, np.random.default_rng([seed, 2]))
    plan = plan_layout(run, policy, Topology.from_config(run.gpu, run.cluster))
    rng = np.random.default_rng(seed)
    workload = build_workload(run.workload, max_context_len=run.model.max_context_len, rng=rng)

    env = SimEnvironment()
    sink = RequestSink(out_dir / "requests.parquet" if out_dir else None)
    itl = ITLHistogram()
    colocated = plan.kind != "serving"
    if colocated:
        def on_done(r) -> None:
            sink(r)
            backend.on_request_finished(r)
            if finished() and not stop.triggered:
                stop.succeed()

        backend = SimBackend(env, run, policy, plan, on_done, itl, seed)
        system = backend.system
        stop = env.event()   # training never runs dry: the run ends when serving does

        def dispatch(r) -> None:
            backend.on_request_arrival()
            system.dispatch(r)
        arrivals = ArrivalFeed(env, workload, dispatch)
        backend.watch_arrivals(arrivals)
    else:
        backend = SimBackend(env, run, policy, plan, sink, itl, seed)
        system = backend.system
        arrivals = ArrivalFeed(env, workload, system.dispatch)
        stop = None

    def finished() -> bool:
        return arrivals.done and system.done == system.arrived

    bar = tqdm(unit="req", desc="simulating", disable=not progress, mininterval=0.5, leave=False)

    def on_tick(now: float) -> None:
        bar.update(system.done - bar.n)
        bar.set_postfix_str(f"t={now:,.0f}s", refresh=False)

    sampler = TimelineSampler(env, system, run.metrics.timeline_interval_s, finished, on_tick if progress else None)
    max_time = run.sim.max_time_s
    try:
        if stop is not None:
            if max_time is not None:
                At(env, float(max_time)).callbacks.append(lambda _ev: stop.triggered or stop.succeed())
            if finished():
                stop.succeed()
            env.run(until=stop)
        else:
            env.run(until=max_time)
        if not finished():
            for r in system.in_flight():
                r.status = "unfinished_at_end"
                sink(r)
            for r in arrivals.remaining():  # the rest of the stream: it arrives after the end
                r.status = "not_arrived_before_end"
                sink(r)
        sink.close()
    except BaseException:
        sink.abandon()
        raise
    finally:
        bar.close()
    sim_wall_s = time.perf_counter() - wall0

    backend.close(env.now)
    summary = run_summary(run, backend, sink, itl, workload)
    timeline = sampler.frame()
    result = RunResult(summary, sink, timeline, system, sim_wall_s, out_dir, training=backend.training_frame(),
                       backend=backend)
    if out_dir is not None:
        result.plots = write_outputs(out_dir, run.metrics.plots, result, f"({run.model.name}, {run.policy_name})")
    return result
