"""Training in closed form. Isolated: one step's template against the event-by-event pipeline, and runs
that advance many steps per event against runs with one event per step (the same results, bit for bit).
Finetuners on idle decode instances: runs whose idle micro-batches advance in chains against runs of one
micro-batch at a time (the same results, to float rounding), and the counted sequence pool they rest on.
Co-located pipelines on idle nodes: runs whose idle cycles advance in closed form against runs event by
event, the placement rule that closes their loops, and the cycle arithmetic."""
import math

import numpy as np
import pandas as pd
import pytest

from conftest import run_sim
from simcolo.colocation.nodes import RunningStats
from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import SimEnvironment
from simcolo.hardware.memory import MemoryPool
from simcolo.training.data import TrainTask
from simcolo.training.lora_finetuner import SequencePool
from simcolo.training.node_cycles import Cycles, CycleState, Period
from simcolo.training.pipeline import StageSpec, run_step, step_template
from simcolo.training.schedules import SCHEDULES
from simcolo.workload.request import Request

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


# ---------------------------------------------------------------------- finetuners: idle chains
#: 20 requests over ~2,000 s on 8 H100s: decode instances idle most of the time, LoRA trained beside
SPARSE = ["cluster=h100x8", "workload=poisson", "workload.rate_rps=0.01", "workload.num_requests=20",
          "metrics.timeline_interval_s=60"]
CHAIN_KEY = "finetune_microbatches_in_chains"


def _same_to_rounding(fast, steps, counter=CHAIN_KEY, step_rtol=1e-12):
    """Runs with a closed form on (``fast``) and off (``steps``): the same results to float rounding;
    ``counter`` counts what the closed form advanced (0 with it off)."""
    a, b = dict(fast.summary), dict(steps.summary)
    assert b[counter] == 0
    a.pop(counter), b.pop(counter)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), k
        elif isinstance(x, float):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12), k
        else:
            assert x == y, k
    # every optimizer step, made at the same time to rounding, with the same tokens
    ta, tb = (t.sort_values(["trainer", "version"]).reset_index(drop=True) for t in (fast.training, steps.training))
    pd.testing.assert_frame_equal(ta.drop(columns=["start_s", "end_s"]), tb.drop(columns=["start_s", "end_s"]))
    for c in ("start_s", "end_s"):
        np.testing.assert_allclose(ta[c].to_numpy(), tb[c].to_numpy(), rtol=step_rtol)
    ra, rb = fast.requests(), steps.requests()
    for c in ra.columns:
        if ra[c].dtype.kind == "f":
            np.testing.assert_allclose(ra[c].to_numpy(), rb[c].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=c)
        else:
            assert (ra[c] == rb[c]).all(), c
    la, lb = fast.timeline, steps.timeline
    assert list(la.columns) == list(lb.columns) and len(la) == len(lb)
    for c in la.columns:
        np.testing.assert_allclose(la[c].to_numpy(), lb[c].to_numpy(), rtol=1e-9, atol=1e-9, err_msg=c)


@pytest.mark.parametrize("policy", ["harli", "static_share", "flexllm", "tidal_lora"])
def test_idle_chains_give_the_results_of_one_micro_batch_at_a_time(policy):
    chains = run_sim(*SPARSE, f"policy={policy}")
    steps = run_sim(*SPARSE, f"policy={policy}", "sim.training_spans=false")
    s = chains.summary
    assert s["optimizer_steps"] > 1000
    # idle most of the time: most micro-batches ran in chains (the rest beside decode, or cut by it)
    assert s[CHAIN_KEY] > 0.9 * s["finetune_microbatches"]
    _same_to_rounding(chains, steps)


def test_idle_chains_under_load_give_the_results_of_one_micro_batch_at_a_time():
    """The conv trace keeps the decode instances busy: chains form in the gaps and end as requests come."""
    case = ["policy=harli", "cluster=h100x8", "workload.max_requests=1500"]
    chains = run_sim(*case)
    assert 0 < chains.summary[CHAIN_KEY] < chains.summary["finetune_microbatches"]
    _same_to_rounding(chains, run_sim(*case, "sim.training_spans=false"))


@pytest.mark.parametrize("offset, in_optimizer", [(-1e-9, True), (1e-9, False)])
def test_a_chain_settled_in_an_optimizer_step_has_given_its_blocks_back(offset, in_optimizer):
    """The optimizer step runs without the micro-batch's blocks: a run that ends just before a step made in a
    chain ends (inside its optimizer step) holds none, one just after holds the next micro-batch's."""
    base = [*SPARSE, "policy=harli", "workload.num_requests=3"]
    first = run_sim(*base)
    arrivals = np.sort(first.requests().arrival_s.to_numpy())
    i = int(np.argmax(np.diff(arrivals)))                     # the longest gap between requests
    steps = first.training[first.training.trainer == 0]
    k = int(steps.end_s.searchsorted(arrivals[i + 1])) - 2    # a step made in the idle chain before the next one
    t = float(steps.end_s.iloc[k]) + offset
    assert t > arrivals[i] + 30   # the requests before were long done: the instances were idle
    ends = {}
    for spans in ("true", "false"):
        r = run_sim(*base, f"sim.max_time_s={t!r}", f"sim.training_spans={spans}")
        ft = r.backend.finetuners[0]
        ends[spans] = (ft.version, ft.micro_batches, ft.held, ft.inst.lent_blocks, r.summary["train_tokens_per_s"])
        if spans == "true":
            assert ft.chained_microbatches > 0.9 * ft.micro_batches
    assert ends["true"][0] == k + (0 if in_optimizer else 1)
    assert (ends["true"][2] == 0) == in_optimizer
    assert ends["true"][:4] == ends["false"][:4]
    assert ends["true"][4] == pytest.approx(ends["false"][4], rel=1e-9)


def test_sequence_pool_hands_out_and_completes_tasks_in_fifo_order_by_count():
    pool = SequencePool()
    tasks = [TrainTask(i, 0.0, 4, 16) for i in range(3)]
    for t in tasks:
        pool.add(t)
    assert pool.available == 12
    a = pool.take(3)                       # sequences 0-2 of task 0
    b = pool.take(3)                       # sequence 3 of task 0, 0-1 of task 1
    assert [(t.id, k) for t, k in a] == [(0, 3)] and [(t.id, k) for t, k in b] == [(0, 1), (1, 2)]
    # b finishes first: 3 sequences trained, counted from the front: task 0 is not covered yet
    assert pool.finish(b, 1.0) == [] and pool.available == 6
    pool.put_back(a)                       # a is aborted: its 3 go back
    assert pool.available == 9
    c = pool.take(5)
    assert pool.finish(c, 2.0) == [tasks[0], tasks[1]] and tasks[1].finish_s == 2.0
    assert list(pool.tasks) == [tasks[2]] and pool.available == 4


def test_a_chain_is_in_its_optimizer_step_exactly_when_its_position_says_so():
    """``in_optimizer_step`` finds the step by division; ``_chain_position`` by a search over the chain's end
    times. Random chains, random times and the chains' own edges (a micro-batch's end, a step's end, the
    float just before): the same answer every time, both kinds of answer met."""
    import types

    from simcolo.training.lora_finetuner import LoraFinetuner

    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(300):
        G = int(rng.integers(1, 9))
        chain = (float(rng.uniform(0, 1e6)), int(rng.integers(0, G)), float(rng.uniform(1e-3, 2.0)),
                 float(rng.choice([0.0, rng.uniform(1e-4, 5.0)])))
        ft = types.SimpleNamespace(_chain=chain, global_batch=G)
        ft._micro_batch_end = lambda j, ft=ft: LoraFinetuner._micro_batch_end(ft, j)
        ends = [ft._micro_batch_end(int(j)) for j in rng.integers(1, 200, 10)]
        times = [*(chain[0] + rng.uniform(0, 200 * (G * chain[2] + chain[3]), 20)), *ends,
                 *(e + chain[3] for e in ends), *(np.nextafter(e, 0) for e in ends)]
        for now in times:
            want = LoraFinetuner._chain_position(ft, now)[2] == "opt"
            assert LoraFinetuner.in_optimizer_step(ft, now) == want, (chain, G, now)
            seen.add(want)
    assert seen == {True, False}


def test_sequence_pool_recycles_a_backlog_in_bulk_as_one_by_one():
    def backlog():
        pool = SequencePool()
        done = []
        pool.recycle = done.append
        for i in range(4):
            pool.add(TrainTask(i, 0.0, 3, 16))
        return pool, done
    bulk, recycled = backlog()
    bulk.trained_in_bulk(29)               # 9 tasks and 2 sequences of the tenth
    one, _ = backlog()
    n = 0
    for _ in range(29):
        for task in one.finish(one.take(1), 0.0):
            n += 1
            one.add(TrainTask(100 + n, 0.0, 3, 16))   # the backlog's replacement
    assert recycled == [9] and n == 9
    assert bulk.available == one.available == 12 - 2
    assert [t.id for t in bulk.tasks] == [1, 2, 3, 0]   # rotated by 9: the same objects queued again
    assert bulk.take(5)[0][1] == one.take(5)[0][1] == 1   # both hand out the front task's last sequence first


# ---------------------------------------------------------------------- co-located pipelines: idle cycles
#: 2 requests ~4 simulated hours apart on 8 H100s (4 nodes of 2 stages): full training beside, nodes idle
PIPE_SPARSE = ["cluster=h100x8", "workload=poisson", "workload.rate_rps=0.000165", "workload.num_requests=2",
               "metrics.timeline_interval_s=600"]
CYCLE_KEY = "train_periods_in_closed_form"


@pytest.mark.parametrize("policy", ["mix_rr", "mix_luf", "mix_random", "lemix", "tidal"])
def test_idle_cycles_give_the_results_of_event_by_event_pipelines(policy):
    cycles = run_sim(*PIPE_SPARSE, f"policy={policy}")
    steps = run_sim(*PIPE_SPARSE, f"policy={policy}", "sim.training_spans=false")
    # thousands of optimizer steps, nearly all of them in closed form; each request served beside them
    assert steps.summary["optimizer_steps"] > 2000
    tasks_per_period = cycles.backend.training.global_batch
    assert cycles.summary[CYCLE_KEY] * tasks_per_period > 0.9 * cycles.summary["train_tasks_done"]
    assert cycles.summary["num_finished"] == 2
    # ends of steps summed period by period against kernel by kernel: ~1e-8 s of ~2e4 s
    _same_to_rounding(cycles, steps, CYCLE_KEY, step_rtol=1e-10)


#: 12 requests ~100 s apart: each node's loop is disturbed often, and some requests are served whole
#: between two of a node's task ends (mix_random placed tasks during them)
PIPE_BUSY = ["cluster=h100x8", "workload=poisson", "workload.rate_rps=0.01", "workload.num_requests=12",
             "metrics.timeline_interval_s=600"]


@pytest.mark.parametrize("policy", ["mix_rr", "mix_random", "lemix"])
def test_advances_end_at_the_point_nearest_before_each_request_with_the_results_of_event_by_event(policy):
    cycles = run_sim(*PIPE_BUSY, f"policy={policy}")
    steps = run_sim(*PIPE_BUSY, f"policy={policy}", "sim.training_spans=false")
    pipes = cycles.backend.trainers
    # advances end inside a period, at the last point before a request, on every node
    assert all(p.advances_to_a_point >= 3 for p in pipes)
    assert sum(p.advances_to_a_point for p in pipes) >= cycles.summary["num_finished"]
    _same_to_rounding(cycles, steps, CYCLE_KEY, step_rtol=1e-10)


def test_the_placement_stands_while_nothing_is_served():
    r = run_sim(*PIPE_SPARSE, "policy=mix_rr")
    placement, now = r.backend.placement, r.backend.env.now
    assert placement.serving_nothing()
    homes = [2, 2, 2, 2]
    tasks = [TrainTask(10_000 + i, now, 4, 4096, home=h) for i, h in enumerate(homes)]
    for t in tasks:
        placement.place(t)
    assert [t.node for t in tasks] == homes            # round robin not asked: each stays home
    # a deferred task is not offered again when a task finishes (round robin would take it at once)
    waiting = TrainTask(30_000, now, 4, 4096)
    placement.deferred.append(waiting)
    placement.task_finished()
    assert placement.deferred == [waiting] and waiting.node == -1
    # a request waiting on node 0: the policy places every task again (round robin: all four nodes)
    r.backend.nodes[0].instance.waiting.append(Request(99, now, 16, 4))
    assert not placement.serving_nothing()
    placement.task_finished()
    assert placement.deferred == [] and waiting.node >= 0
    tasks = [TrainTask(20_000 + i, now, 4, 4096, home=2) for i in range(4)]
    for t in tasks:
        placement.place(t)
    assert sorted(t.node for t in tasks) == [0, 1, 2, 3]


def test_running_stats_take_repeated_values_as_one_by_one():
    rng = np.random.default_rng(3)
    one, bulk = RunningStats(), RunningStats()
    for x in rng.normal(1000.0, 30.0, 7):
        one.add(x)
        bulk.add(x)
    for _ in range(500):
        one.add(16384.0)
    bulk.add_repeated(16384.0, 500)
    assert bulk.n == one.n
    assert bulk.mean == pytest.approx(one.mean, rel=1e-12)
    assert bulk.std == pytest.approx(one.std, rel=1e-9)


def _cycle(phase_s=0.0, k=3):
    """A period of 10 s measured from t=100 s: stage 0 busy 1-4 s and 6-7 s, activations held 2-8 s, a
    version at 9 s."""
    first = CycleState(100.0, (), (), (50.0,), (50.0,), (0.0,), 0.0, 0, 0, 0, (0,), 0)
    last = CycleState(110.0, (), (), (54.0,), (54.0,), (4.0,), 10.0, 2, 8, 0, (1,), 1)
    period = Period(first, last, [[(1.0, 4.0), (6.0, 7.0)]], [[(2.0, 5e9), (8.0, -5e9)]], [1e9], np.array([9.0]))
    return Cycles(200.0, k, period, phase_s)


def test_cycles_read_busy_time_activations_and_steps_inside_the_periods():
    c = _cycle()
    assert c.end_s == 230.0
    assert c.busy_s(0, 203.0) == pytest.approx(2.0)        # 1-3 s of the first period
    assert c.busy_s(0, 216.5) == pytest.approx(4.0 + 3.5)  # a period, then 1-4 and 6-6.5
    assert c.busy_s(0, 999.0) == pytest.approx(12.0)       # clipped to the 3 periods
    assert c.activations_moved(0, 205.0) == 5e9 and c.activations_moved(0, 219.0) == 0.0
    np.testing.assert_allclose(c.step_ends(), [209.0, 219.0, 229.0])
    assert c.scaled("tasks") == 6 and c.scaled("busy") == [12.0]
    # the loop came back 5 s into the measured period: the same periods, read from there
    c = _cycle(phase_s=5.0)
    assert c.busy_s(0, 202.0) == pytest.approx(1.0)        # 6-7 s of the period
    assert c.busy_s(0, 208.0) == pytest.approx(1.0 + 2.0)  # then the next period's 1-3 s
    assert c.activations_moved(0, 204.0) == -5e9            # released at 8 s, held again from 12 s
    assert c.activations_moved(0, 208.0) == 0.0
    np.testing.assert_allclose(c.step_ends(), [204.0, 214.0, 224.0])


def test_cycles_that_end_at_another_point_of_the_period():
    """The period of ``_cycle`` with a point 5 s into it (a task ended there: stage 0 had been busy 1-4 s)."""
    c = _cycle()
    first, last, period = c.period.first, c.period.last, c.period
    mid = CycleState(105.0, (), (), (53.0,), (53.0,), (3.0,), 5.0, 1, 4, 0, (0,), 0)
    period.points = [(0.0, first), (5.0, mid)]
    # from the period's start: 2 periods, then 5 s on to the point
    c = Cycles(200.0, 2, period, 0.0, 5.0, first, mid)
    assert c.end_s == 225.0
    assert c.scaled("tasks") == 2 * 2 + 1 and c.scaled("busy") == [2 * 4.0 + 3.0]
    assert c.busy_s(0, 999.0) == pytest.approx(11.0)       # clipped to the 25 s advanced
    np.testing.assert_allclose(c.step_ends(), [209.0, 219.0])   # the version at 9 s is past the point
    # from the point: 1 period, then on across the period's start to the point at 0 s (10 s later)
    c = Cycles(200.0, 1, period, 5.0, 5.0, mid, first, wrapped=True)
    assert c.end_s == 215.0
    assert c.scaled("busy") == [2 * 4.0 - 3.0]            # 5-20 s into the period: 6-7, 11-14 and 16-17 s
    assert c.busy_s(0, 215.0) == pytest.approx(5.0)
    assert c.scaled("tasks") == 2 * 2 - 1 and c.scaled("version") == 2
    np.testing.assert_allclose(c.step_ends(), [204.0, 214.0])
    assert c.activations_moved(0, 215.0) == c.period.held_at(0, 0.0) - c.period.held_at(0, 5.0) == -5e9


def test_training_records_are_in_end_order_and_steps_ending_together_keep_their_order():
    """One row per step, rows and closed-form blocks merged by end time (stable: a tie keeps the order the
    steps were recorded in), with the columns' types even when empty."""
    from simcolo.backend import TrainingRecords

    empty = TrainingRecords().frame()
    assert list(empty.columns) == list(TrainingRecords.COLUMNS) and len(empty) == 0
    assert empty.dtypes.astype(str).tolist() == ["int64", "int64", "float64", "float64", "int64", "int64"]
    rec = TrainingRecords()
    rec.add(0, 1, float("nan"), 2.0, 8, 100)
    rec.add(1, 1, 0.0, 5.0, 8, 100)
    rec.add_steps(2, 1, np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]), 4, np.array([10, 20, 30]))
    rec.add_steps(3, 7, np.array([4.0]), np.array([5.0]), 4, np.array([40]))
    df = rec.frame()
    assert len(rec) == len(df) == 6
    assert df.end_s.tolist() == [1.0, 2.0, 2.0, 3.0, 5.0, 5.0]
    assert df.trainer.tolist() == [2, 0, 2, 2, 1, 3]      # ties: rows before blocks, blocks in order
    assert df.version.tolist() == [1, 1, 2, 3, 1, 7]
    assert df.tokens.tolist() == [10, 100, 20, 30, 100, 40] and math.isnan(df.start_s[1])
