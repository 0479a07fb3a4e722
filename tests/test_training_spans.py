"""Isolated training in closed form: one step's template against the event-by-event pipeline, and runs
that advance many steps per event against runs with one event per step (the same results, bit for bit)."""
import math

import numpy as np
import pandas as pd
import pytest

from conftest import run_sim
from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import SimEnvironment
from simcolo.hardware.memory import MemoryPool
from simcolo.training.pipeline import StageSpec, run_step, step_template
from simcolo.training.schedules import SCHEDULES

CASES = [  # S, M, forward per stage, backward per stage, link, optimizer per stage
    (1, 3, [1.0], [2.0], 0.0, [0.5]),
    (2, 4, [1.0, 1.3], [2.0, 2.9], 0.1, [0.2, 0.3]),
    (4, 8, [0.7, 0.9, 0.8, 1.1], [1.5, 2.0, 1.7, 2.4], 0.05, [0.1] * 4),
    (3, 5, [1e-3, 2e-3, 1.5e-3], [2e-3, 4e-3, 3e-3], 1e-4, [0.0] * 3),
]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("S, M, f, b, link, opt", CASES)
def test_template_is_what_the_event_by_event_step_does_on_dedicated_gpus(schedule, S, M, f, b, link, opt):
    act = [1e6 * (s + 1) for s in range(S)]
    env = SimEnvironment()
    # the isolated trainer's step: the pipeline (``run_step``), then the all-reduce, then every optimizer
    stages = [StageSpec(SharedCompute(env), f[s], b[s], 0.0, MemoryPool(1e12, f"gpu{s}"), act[s])
              for s in range(S)]
    _, result = run_step(env, stages, SCHEDULES[schedule](S, M), link)
    env.run()
    allreduce = 0.25
    tpl = step_template(f, b, opt, act, SCHEDULES[schedule](S, M), link, allreduce)
    assert tpl.compute_end_s == pytest.approx(result.compute_end_s, rel=1e-12)
    assert tpl.duration_s == pytest.approx(result.step_time_s + allreduce + max(opt), rel=1e-12)
    assert tpl.busy_s == pytest.approx(tuple(result.busy_s), rel=1e-12)
    assert tpl.peak_activation_bytes == pytest.approx(tuple(result.peak_activation_bytes))
    for s in range(S):
        ops = sorted((start, end) for st, kind, _, start, end in result.records if st == s)
        np.testing.assert_allclose([(a, e) for _, a, e in tpl.ops[s]], ops, rtol=1e-12)
        # the GPU's processor-sharing clock: forward, backward and optimizer kernels, none at once
        assert tpl.gpu_busy_s[s] == pytest.approx(stages[s].compute.busy_s + opt[s], rel=1e-12)
        assert tpl.gpu_busy_until(s, tpl.duration_s, partial=False) == pytest.approx(tpl.gpu_busy_s[s])
    # busy up to a time inside a kernel: only ended kernels, or the running one up to then
    _, start, end = tpl.ops[0][0]
    mid = (start + end) / 2
    assert tpl.gpu_busy_until(0, mid, partial=False) == 0.0
    assert tpl.gpu_busy_until(0, mid, partial=True) == pytest.approx(mid - start)


SLICE = ["policy=isolated", "cluster=h100x8", "workload.max_requests=500", "workload.rate_scale=2"]
SPAN_CASES = {
    "backlog": [],                                                     # tasks replaced at once: recycled
    "backlog, sync every 3, gpipe": ["policy.sync_every=3", "training.schedule=gpipe", "training.global_batch=4"],
    "poisson share": ["training.data.kind=poisson", "training.data.share=0.6", "training.global_batch=4"],
    "ends mid-span": ["sim.max_time_s=101.3", "policy.sync_every=50"],
}


@pytest.mark.parametrize("case", sorted(SPAN_CASES))
def test_spans_of_steps_give_the_results_of_one_event_per_step(case):
    spans = run_sim(*SLICE, *SPAN_CASES[case])
    steps = run_sim(*SLICE, *SPAN_CASES[case], "sim.training_spans=false")
    a, b = spans.summary, steps.summary
    assert a["optimizer_steps"] > 3
    def numbers(s):   # NaN (a metric that does not apply) is not equal to itself
        return {k: v for k, v in s.items() if not (isinstance(v, float) and math.isnan(v))}
    assert numbers(a) == numbers(b)
    pd.testing.assert_frame_equal(spans.training, steps.training)
    pd.testing.assert_frame_equal(spans.requests(), steps.requests())
    # timeline samples (busy clocks mid-span are summed in another order: equal to rounding)
    ta, tb = spans.timeline, steps.timeline
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
    for c in ta.columns:
        np.testing.assert_allclose(ta[c].to_numpy(), tb[c].to_numpy(), rtol=1e-12, atol=1e-9)
    # the training GPUs were busy, and the timeline saw it while the steps ran
    train_gpus = [g for grp in spans.backend.plan.train_groups for g in grp]
    assert ta[ta.gpu.isin(train_gpus)].utilization.max() > 0.5


def test_steps_run_back_to_back_at_the_template_duration():
    r = run_sim(*SLICE)
    tpl = r.backend.trainer.template
    steps = r.training
    np.testing.assert_allclose(np.diff(steps.end_s.to_numpy()), tpl.duration_s, rtol=1e-9)
    np.testing.assert_allclose(steps.start_s.to_numpy()[1:], steps.end_s.to_numpy()[:-1])
    # every task a step finished was replaced: the backlog stays full
    assert r.summary["train_queued_tasks"] + r.backend.trainer.tasks_per_step == r.backend.training.data.backlog
