"""The live co-located pipeline (simcolo/replay/node_pipeline.py) on the tiny model, CPU float32, real
threads and a real LiveContext: tasks train to completion with S = 1 and S = 2 stages, the served model
is the trained one, a 2-stage run computes what one whole-model TrainingRunner computes, async release
keeps at most max_inflight tasks in flight, the memory gate holds forwards, and a failing stage stops
every stage thread."""
import threading
import time

import pytest
import torch

from simcolo.engine.model import build_model, stage_layers
from simcolo.engine.runner import TrainingRunner
from simcolo.hardware.memory import MemoryPool
from simcolo.replay.context import LiveContext
from simcolo.replay.node_pipeline import LiveNodePipeline, stage_models, task_tokens
from simcolo.specs import load_model_spec
from simcolo.training.data import TrainTask

torch.set_num_threads(1)
MB, SEQ, ACT = 2, 16, 1000.0
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("tiny")


class Harness:
    """A pipeline over a fresh served model, with callbacks that record what happened."""

    def __init__(self, spec, S, *, release="sync", global_batch=2, max_inflight=1, gate=None, lr=1e-3,
                 copy=False, index=0):
        self.live = LiveContext("cpu")
        self.served = build_model(spec, device="cpu", dtype=torch.float32, seed=0)
        self.initial = {k: v.clone() for k, v in self.served.state_dict().items()}
        devices = [torch.device("cpu")] * S
        self.models = stage_models(self.served, S, devices, copy=copy)
        self.pools = [MemoryPool(1e6, f"gpu{s}") for s in range(S)]
        self.done: list[int] = []
        self.versions: list[tuple[int, int]] = []      # (version, tasks done when it was reached)
        self.cond = threading.Condition(self.live.lock)
        self.pipe = LiveNodePipeline(index, self.models, devices, list(range(S)), self.live, [0.01] * S, [0.02] * S,
                                     [0.005] * S, [ACT] * S, global_batch, release, max_inflight, self.pools, gate,
                                     spec.vocab_size, SEQ, self._task_done, self._version, lr=lr)

    def _task_done(self, task):
        self.done.append(task.id)
        self.cond.notify_all()

    def _version(self, pipe):
        self.versions.append((pipe.version, len(self.done)))
        self.cond.notify_all()

    def place(self, ids):
        with self.live.lock:
            for i in ids:
                self.pipe.place(TrainTask(i, self.live.now, MB, SEQ))

    def wait_done(self, n, versions=0):
        with self.cond:
            assert self.cond.wait_for(lambda: (len(self.done) >= n and self.pipe.version >= versions)
                                      or self.live.stopped, TIMEOUT), "pipeline did not finish its tasks"
        assert self.live.failure is None, self.live.failure

    def start(self):
        self.live.start()
        self.pipe.start()

    def stop(self):
        self.live.stop()
        self.pipe.stop_and_join(TIMEOUT)
        assert not any(t.is_alive() for t in self.pipe.threads)


def reference_run(spec, tasks, global_batch, lr, index=0):
    """The same tasks, in order, on one whole-model TrainingRunner: per-task losses and the final weights."""
    runner = TrainingRunner(build_model(spec, device="cpu", dtype=torch.float32, seed=0), lr=lr)
    losses = []
    for k, i in enumerate(tasks):
        losses.append(runner.forward_backward(task_tokens(index, i, spec.vocab_size, MB, SEQ)))
        if (k + 1) % global_batch == 0:
            runner.optimizer_step()
    return losses, runner.model.state_dict()


def assert_served_is_trained(h):
    """The served model's weights moved, and every stage slice holds exactly the served weights."""
    served = dict(h.served.named_parameters())
    assert any(not torch.equal(served[k], h.initial[k]) for k in served)
    for m in h.models:
        for name, p in m.named_parameters():
            if name.startswith("layers."):
                _, slot, rest = name.split(".", 2)
                name = f"layers.{m.layer_range.start + int(slot)}.{rest}"
            assert torch.equal(p, served[name]), name


@pytest.mark.parametrize("S", [1, 2])
def test_pipeline_trains_tasks_and_serving_sees_every_step(spec, S):
    h = Harness(spec, S, global_batch=2)
    assert h.pipe.S == S and h.pipe.thread is h.pipe.threads[0] and len(h.pipe.threads) == S
    if S == 1:
        assert h.models == [h.served]
    else:
        assert [m.layer_range for m in h.models] == [stage_layers(spec, 2, s) for s in range(2)]
        assert h.models[0].embed_tokens.weight is h.served.embed_tokens.weight
        assert h.models[1].lm_head.weight is h.served.lm_head.weight
    h.pipe.warm_up(2, MB, SEQ)   # does not train
    for k, v in h.served.state_dict().items():
        assert torch.equal(v, h.initial[k]), k
    assert all(p.grad is None for p in h.served.parameters())
    assert all(not opt.state for opt in h.pipe.optimizers if opt is not None)

    h.place(range(6))
    assert h.pipe.rules.queued == 6
    assert h.pipe.stage_backlogs_s()[S - 1] == pytest.approx(6 * (0.01 + 0.02))
    h.start()
    try:
        h.wait_done(6, versions=3)
    finally:
        h.stop()
    assert h.done == list(range(6))
    assert h.versions == [(1, 2), (2, 4), (3, 6)]
    assert h.pipe.rules.steps_done == [3] * S and h.pipe.rules.queued == 0
    assert [i for i, _ in h.pipe.losses] == list(range(6))
    assert all(p.by_use["train_activations"] == 0 for p in h.pools) and all(p.peak == ACT for p in h.pools)
    assert h.pipe.stage_backlogs_s() == [0.0] * S
    assert not h.pipe.busy
    assert_served_is_trained(h)
    r = h.pipe.report()
    assert (r.sequences_done, r.tokens_done) == (6 * MB, 6 * MB * SEQ)
    assert r.work_s == pytest.approx(sum(h.pipe.rules.stage_busy_s)) and all(b > 0 for b in h.pipe.rules.stage_busy_s)
    # span: S x time with a task in flight (as the simulator's, the last optimizer step runs after it)
    assert 0 < r.span_s and r.counters == {"train_queued_tasks": 0}
    assert h.pipe.busy_by_gpu() == dict(enumerate(h.pipe.rules.stage_busy_s))
    assert h.pipe.solo_s == [0.0, 0.0]   # serving_idle defaults to "serving is busy"


def test_two_stages_compute_what_one_whole_model_computes(spec):
    tasks, gb, lr = list(range(6)), 2, 1e-3
    h = Harness(spec, 2, release="sync", global_batch=gb, lr=lr)
    h.place(tasks)
    h.start()
    try:
        h.wait_done(len(tasks), versions=3)
    finally:
        h.stop()
    ref_losses, ref_weights = reference_run(spec, tasks, gb, lr)
    losses = [loss for _, loss in h.pipe.losses]
    assert losses == pytest.approx(ref_losses, abs=1e-5, rel=0)
    assert losses[-1] != pytest.approx(losses[0], abs=1e-4)   # the later tasks ran on trained weights
    for k, v in h.served.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], atol=1e-5, rtol=0)


def test_stage_copies_write_their_weights_into_the_served_model(spec):
    """Where a stage cannot share the served tensors (another device) it trains a copy and writes it back
    after each optimizer step."""
    h = Harness(spec, 2, copy=True, global_batch=1)
    assert all(m.serves_into for m in h.models)
    assert all(p is not h.served.get_parameter(n) for n, p in h.models[0].named_parameters())
    h.place(range(2))
    h.start()
    try:
        h.wait_done(2, versions=2)
    finally:
        h.stop()
    assert_served_is_trained(h)


def test_async_release_keeps_at_most_max_inflight_tasks_in_flight(spec):
    """Async release with a step after every task: stages step while later tasks' forwards wait for their
    backwards (the in-place update must not break those backwards)."""
    h = Harness(spec, 2, release="async", global_batch=1, max_inflight=2)
    peak_act = [0.0, 0.0]
    with h.live.lock:
        orig = h.pipe._finish

        def finish(s, op, task, out):
            peak_act[s] = max(peak_act[s], h.pools[s].by_use["train_activations"])
            orig(s, op, task, out)
        h.pipe._finish = finish
    h.place(range(8))
    h.start()
    try:
        h.wait_done(8, versions=8)
    finally:
        h.stop()
    assert h.pipe.rules.inflight_peak == 2
    assert max(peak_act) <= 2 * ACT
    assert sorted(h.done) == list(range(8)) and h.pipe.version == 8
    assert_served_is_trained(h)


def test_sync_release_runs_one_task_at_a_time(spec):
    h = Harness(spec, 2, release="sync", global_batch=4, max_inflight=3)
    h.place(range(4))
    h.start()
    try:
        h.wait_done(4, versions=1)
    finally:
        h.stop()
    assert h.pipe.rules.inflight_peak == 1


def test_closed_memory_gate_holds_forwards_until_it_opens(spec):
    state = {"open": False, "calls": []}

    def gate(gpu, nbytes):
        state["calls"].append((gpu, nbytes))
        return state["open"]

    h = Harness(spec, 1, gate=gate, global_batch=1)
    h.place(range(2))
    h.start()
    try:
        time.sleep(0.1)
        with h.live.lock:
            assert h.done == [] and h.pipe.rules.stage_busy_s == [0.0] and h.pools[0].used == 0
            assert len(state["calls"]) >= 3          # re-checked every ~5 ms
            assert set(state["calls"]) == {(0, ACT)}
            state["open"] = True
        h.wait_done(2, versions=2)
    finally:
        h.stop()
    assert h.done == [0, 1]


def test_a_failing_stage_is_the_replay_failure_and_every_stage_thread_ends(spec):
    h = Harness(spec, 2, global_batch=1)
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected kernel error")

    h.models[1].layers[0].register_forward_hook(boom)
    h.place(range(4))
    h.start()
    for t in h.pipe.threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in h.pipe.threads)
    assert h.live.stopped
    assert "node 0 training stage 1" in h.live.failure and "injected kernel error" in h.live.failure
    assert h.done == [0]
    assert not h.pipe.busy
    h.pipe.stop_and_join(1.0)
