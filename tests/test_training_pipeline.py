"""Pipeline schedules and one training step on the real SimPy model, against closed forms."""
import pytest

from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import SimEnvironment
from simcolo.hardware.interference import UniformSlowdown
from simcolo.hardware.memory import MemoryPool
from simcolo.training.pipeline import StageSpec, run_step
from simcolo.training.schedules import SCHEDULES, gpipe, one_f_one_b

SHAPES = [(1, 1), (2, 1), (2, 4), (4, 2), (4, 8), (3, 5), (8, 16)]


@pytest.mark.parametrize("S, M", SHAPES)
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_stage_runs_each_forward_then_backward_once(name, S, M):
    for ops in SCHEDULES[name](S, M):
        assert sorted((o.kind, o.micro_batch) for o in ops) == sorted((k, i) for k in "FB" for i in range(M))
        for i in range(M):
            assert ops.index(next(o for o in ops if o.micro_batch == i and o.kind == "F")) < \
                   ops.index(next(o for o in ops if o.micro_batch == i and o.kind == "B"))


def _in_flight(ops):
    held = peak = 0
    for o in ops:
        held += 1 if o.kind == "F" else -1
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("S, M", SHAPES)
def test_in_flight_micro_batches(S, M):
    assert [_in_flight(ops) for ops in gpipe(S, M)] == [M] * S
    assert [_in_flight(ops) for ops in one_f_one_b(S, M)] == [min(S - s, M) for s in range(S)]


def _step(S, M, schedule, f=1.0, b=2.0, link_s=0.0, act=0.0, interference=None, optimizer_s=0.0):
    env = SimEnvironment()
    stages = [StageSpec(SharedCompute(env, interference), f, b, optimizer_s, MemoryPool(1e12, f"gpu{s}"), act)
              for s in range(S)]
    proc, result = run_step(env, stages, SCHEDULES[schedule](S, M), link_s)
    env.run()
    assert proc.processed
    return result, stages


@pytest.mark.parametrize("S, M", SHAPES)
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_step_time_and_bubble_match_the_closed_form(name, S, M):
    f, b = 1.0, 2.0
    result, _ = _step(S, M, name, f, b, optimizer_s=0.5)
    assert result.compute_end_s == pytest.approx((M + S - 1) * (f + b))
    assert result.step_time_s == pytest.approx((M + S - 1) * (f + b) + 0.5)
    assert result.bubble_fraction == pytest.approx((S - 1) / (M + S - 1))


def test_link_time_adds_to_the_critical_path():
    # S=2, M=1, f=b=1, link L: F0 [0,1]; F1 [1+L, 2+L]; B1 [2+L, 3+L]; B0 [3+2L, 4+2L]
    result, _ = _step(2, 1, "gpipe", 1.0, 1.0, link_s=0.25)
    assert result.step_time_s == pytest.approx(4.5)


def test_peak_activation_memory_gpipe_versus_1f1b():
    S, M, a = 4, 8, 3.0e9
    gp, stages = _step(S, M, "gpipe", act=a)
    assert gp.peak_activation_bytes[0] == M * a and stages[0].memory.peak == M * a
    fb, stages = _step(S, M, "1f1b", act=a)
    assert fb.peak_activation_bytes == [min(S - s, M) * a for s in range(S)]
    assert all(st.memory.used == 0 for st in stages)   # every activation released by its backward


def test_co_running_kernels_slow_the_step_through_processor_sharing():
    env = SimEnvironment()
    compute = SharedCompute(env, UniformSlowdown(1.0))
    compute.run("decode", 10.0)    # an inference kernel running beside training on the same GPU
    proc, result = run_step(env, [StageSpec(compute, 1.0, 1.0)], gpipe(1, 1))
    env.run(until=proc)
    # both kernels at half speed: the forward takes 2 s and the backward 2 s
    assert result.step_time_s == pytest.approx(4.0)
