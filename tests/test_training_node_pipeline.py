"""The co-located node pipeline (task by task, async or sync release) on the real SimPy model."""
import pytest

from simcolo.hardware.cluster import GPU
from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import SimEnvironment
from simcolo.hardware.interference import UniformSlowdown
from simcolo.hardware.memory import MemoryPool
from simcolo.specs import load_gpu_spec
from simcolo.training.data import TrainTask
from simcolo.training.node_pipeline import NodePipeline


def _pipeline(S, release, f=1.0, b=2.0, opt=0.0, global_batch=1000, max_inflight=100, act=1.0, capacity=1e12,
              gate=None, interference=None):
    env = SimEnvironment()
    spec = load_gpu_spec("h100-sxm")
    gpus = [GPU(i, 0, spec, MemoryPool(capacity, f"gpu{i}"), SharedCompute(env, interference, i))
            for i in range(S)]
    done, versions = [], []
    pipe = NodePipeline(env, 0, gpus, [f] * S, [b] * S, [opt] * S, [act] * S, 0.0, global_batch, release,
                        max_inflight, done.append, lambda p: versions.append((env.now, p.version)), gate)
    return env, pipe, gpus, done, versions


@pytest.mark.parametrize("S", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_sync_release_runs_one_task_at_a_time(S, n):
    env, pipe, _, done, _ = _pipeline(S, "sync")
    for i in range(n):
        pipe.place(TrainTask(i, 0.0, 1, 128))
    env.run()
    assert [t.finish_s for t in done] == pytest.approx([(k + 1) * S * 3.0 for k in range(n)])
    assert pipe.rules.active_s == pytest.approx(n * S * 3.0)
    # bubble: each stage works 3 of every 3S seconds
    assert 1 - sum(pipe.rules.stage_busy_s) / (S * pipe.rules.active_s) == pytest.approx((S - 1) / S)


@pytest.mark.parametrize("S, n", [(2, 6), (4, 10), (3, 7)])
def test_async_release_overlaps_tasks_and_fills_the_pipeline(S, n):
    # async: the next task enters when the previous finished its stage-0 forward; backward first.
    env, pipe, _, done, _ = _pipeline(S, "async")
    for i in range(n):
        pipe.place(TrainTask(i, 0.0, 1, 128))
    env.run()
    sync_time = n * S * 3.0
    assert done[-1].finish_s < sync_time
    # no stage can do its n forwards and n backwards faster than back to back
    assert done[-1].finish_s >= n * 3.0
    assert sorted(t.id for t in done) == list(range(n))
    assert 1 - sum(pipe.rules.stage_busy_s) / (S * pipe.rules.active_s) < (S - 1) / S


def test_max_inflight_bounds_activation_memory_and_versions_follow_optimizer_steps():
    env, pipe, gpus, done, versions = _pipeline(2, "async", opt=0.5, global_batch=2, max_inflight=2, act=10.0)
    peak = [0.0, 0.0]
    for i in range(6):
        pipe.place(TrainTask(i, 0.0, 1, 128))

    def watch():
        while len(done) < 6:
            for s, g in enumerate(gpus):
                peak[s] = max(peak[s], g.memory.by_use["train_activations"])
            yield env.timeout(0.25)
    env.process(watch())
    env.run()
    assert max(peak) <= 20.0 and max(peak) == 20.0      # two tasks' activations at most, and reached
    assert all(g.memory.by_use["train_activations"] == 0 for g in gpus)
    assert [v for _, v in versions] == [1, 2, 3]          # 6 backwards / global_batch 2
    assert pipe.version == 3


def test_memory_gate_holds_forwards_until_it_opens():
    calls = []
    env, pipe, _, done, _ = _pipeline(1, "sync", gate=lambda g, nbytes: calls.append(nbytes) or env.now >= 0.05)
    pipe.place(TrainTask(0, 0.0, 1, 128))
    env.run()
    assert done[0].finish_s == pytest.approx(0.05 + 3.0, abs=0.006)   # polled every 5 ms
    assert len(calls) > 5


def test_backlog_counts_the_running_op_as_its_prediction_less_the_time_it_has_run():
    # One stage, forward 1 s and backward 2 s solo; a co-running kernel halves the training's rate, so the
    # forward truly takes 2 s. A policy sees what a deployment can know (the op's start and its prediction,
    # not its progress): the same rule as the live pipeline's (PipelineRules.backlogs_s).
    env, pipe, gpus, done, _ = _pipeline(1, "sync", interference=UniformSlowdown(1.0))
    gpus[0].compute.run("decode", 100.0)
    pipe.place(TrainTask(0, 0.0, 1, 128))
    pipe.place(TrainTask(1, 0.0, 1, 128))
    seen = {}

    def probe():
        for t in (0.5, 1.5, 2.5):
            yield env.timeout(t - env.now)
            seen[t] = pipe.stage_backlogs_s()[0]
    env.process(probe())
    env.run(until=3.0)
    # task 0's forward (started at 0): 1 - 0.5 left, then its backward and task 1's forward and backward
    assert seen[0.5] == pytest.approx(0.5 + 2.0 + 3.0)
    # at 1.5 the forward has done 0.75 s of its 1 s of work, but its prediction (1 s) has run out
    assert seen[1.5] == pytest.approx(0.0 + 2.0 + 3.0)
    # the backward started at 2.0 (the forward took 2 s at half rate): 2 - 0.5 left
    assert seen[2.5] == pytest.approx(1.5 + 3.0)
