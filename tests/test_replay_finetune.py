"""Live LoRA finetuning on a decode instance (simcolo/replay/finetuner.py) and the device-sharing gate
(simcolo/engine/sm_partition.py), without a backend: the tiny model on the CPU, a real ``LiveInstance``,
a real policy bound to the predictor of a real layout plan (the shipped tiny tables). Timing bounds are
loose upper bounds only (a loaded machine makes a thread slower, never busier)."""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

from simcolo.config.run import RunConfig
from simcolo.config.compose import load_config
from simcolo.engine.model import build_model
from simcolo.engine.runner import LoraTrainingRunner, ServingRunner
from simcolo.engine.sm_partition import TimeShare, layer_checkpoints
from simcolo.hardware.cluster import Topology
from simcolo.layout.plan import plan_layout
from simcolo.metrics.itl import ITLHistogram
from simcolo.policies import make_policy
from simcolo.replay.context import LiveContext
from simcolo.replay.finetuner import LiveFinetuner
from simcolo.replay.live_instance import LiveInstance
from simcolo.serving.batch_scheduler import BatchingConfig
from simcolo.specs import load_model_spec
from simcolo.training.data import TrainTask
from simcolo.training.lora_finetuner import SequencePool
from simcolo.workload.request import Request

pytestmark = pytest.mark.filterwarnings("ignore::simcolo.costs.OffGridWarning")

SEQ = 128          # on the shipped lora_step grid of the tiny tables
CPU = torch.device("cpu")


def _plan(policy: str, *overrides: str):
    cfg = load_config(["model=tiny", f"policy={policy}", "gpu=h100-sxm", "cluster=cpu2", "policy.prefill_instances=1",
                       "policy.decode_instances=1", f"training.seq_len={SEQ}", "training.global_batch=2",
                       "training.micro_batch=2", "policy.max_micro_batch=2", *overrides])
    run = RunConfig.from_cfg(cfg)
    pol = make_policy(run.policy, np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_layout(run, pol, Topology.from_config(run.gpu, run.cluster))
    return pol, plan


class Rig:
    """A decode instance (not started unless asked), a pool, a finetuner and what its callbacks saw."""

    def __init__(self, policy="harli", *overrides, num_blocks=1000, role="decode", static=False):
        self.policy, self.plan = _plan(policy, *overrides)
        self.spec = load_model_spec("tiny")
        self.live = LiveContext("cpu")
        self.done: list[Request] = []
        self.inst = LiveInstance(index=0, role=role, gpus=[0], cost=self.plan.cost, cfg=BatchingConfig(),
                                 num_blocks=num_blocks, on_done=self.done.append, itl=ITLHistogram(), live=self.live,
                                 device=CPU)
        self.model = build_model(self.spec, seed=0)
        self.runner = LoraTrainingRunner(self.model, 4, 8.0, lr=1e-2, generator=torch.Generator().manual_seed(1))
        self.pool = SequencePool()
        self.tasks_done: list[TrainTask] = []
        self.steps: list[tuple] = []
        static_blocks = self.plan.trainer.static_blocks if static else None
        self.ft = LiveFinetuner(0, self.inst, CPU, 0, self.live, self.pool, self.policy, self.plan.predictor,
                                self.runner, SEQ, self.plan.trainer.global_batch, static_blocks, self.spec.vocab_size,
                                self.tasks_done.append, lambda *a: self.steps.append(a))

    def add_tasks(self, n: int, micro_batch: int = 2) -> None:
        with self.live.lock:
            for i in range(n):
                self.pool.add(TrainTask(100 + i, self.live.now, micro_batch, SEQ))

    def start(self, serve: bool = False) -> None:
        self.live.start()
        if serve:
            self.inst.start(ServingRunner(self.model, 4, self.spec.max_context_len), self.spec.vocab_size)
        self.ft.start()

    def wait(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.live.lock:
                if predicate():
                    return
                assert self.live.failure is None, self.live.failure
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.002)

    def stop(self) -> None:
        self.live.stop()
        self.ft.stop_and_join(10)
        self.inst.stop_and_join(10)
        assert not self.ft.thread.is_alive()


def _block_first_forward(runner):
    """Make the runner's first forward wait (before its first layer) until the test releases it."""
    entered, release = threading.Event(), threading.Event()
    original, calls = runner.forward, []

    def forward(ids, targets=None):
        calls.append(ids.shape[0])
        if len(calls) == 1:
            entered.set()
            assert release.wait(30)
        return original(ids, targets)

    runner.forward = forward
    return entered, release, calls


# ------------------------------------------------------------------ training


def test_finetuner_trains_the_adapters_and_steps_every_global_batch():
    rig = Rig("harli")
    before = [p.detach().clone() for p in rig.runner.adapter_params]
    base = {n: p.detach().clone() for n, p in rig.model.named_parameters()}
    rig.ft.warm_up(1, 2, SEQ)
    assert all(torch.equal(a, b) for a, b in zip(before, rig.runner.adapter_params))   # warm-up trains nothing
    rig.add_tasks(4)                      # 8 sequences; max_micro_batch=2 -> 4 micro-batches, 2 steps
    rig.start()
    rig.wait(lambda: len(rig.steps) == 2)
    rig.stop()
    ft = rig.ft
    assert ft.micro_batches == 4 and ft.sequences_done == 8 and ft.tokens_done == 8 * SEQ
    assert ft.version == 2 and [s[0] for s in rig.steps] == [1, 2]
    assert [s[3] for s in rig.steps] == [4 * SEQ, 4 * SEQ]                   # tokens per step
    assert all(s[1] <= s[2] for s in rig.steps) and rig.steps[0][2] <= rig.steps[1][1]
    assert sorted(t.id for t in rig.tasks_done) == [100, 101, 102, 103]
    assert all(t.finish_s > 0 for t in rig.tasks_done)
    assert rig.pool.available == 0 and not rig.pool.tasks
    # the adapters trained (B starts at zero, so a changed B means a real gradient step) ...
    assert all(not torch.equal(a, b) for a, b in zip(before, rig.runner.adapter_params))
    # ... and the served model did not change
    assert all(torch.equal(p, base[n]) for n, p in rig.model.named_parameters())
    # memory: blocks lent per micro-batch and all given back; the instance's lender is the finetuner
    assert rig.inst.lent_blocks == 0 and ft.held == 0 and rig.inst.lender is ft
    # an idle instance: every micro-batch ran alone, measured and predicted
    assert ft.solo_s[0] > 0 and ft.solo_s[1] == pytest.approx(4 * rig.plan.predictor.lora_step_s(2, SEQ))
    assert ft.train_busy_s >= ft.solo_s[0]
    assert len(ft.plans) >= 4 and all(p[4] == 2 and p[3] is None for p in ft.plans)
    assert ft.report().sequences_done == 8 and ft.report().counters == {
        "finetune_aborted_microbatches": 0, "finetune_microbatches": 4, "finetune_microbatches_in_chains": 0,
        "decode_waits_on_finetune_blocks": 0}
    assert ft.sharing_method == "cpu_time_share" and not ft.busy
    assert rig.live.failure is None


def test_static_share_reserves_its_carve_out_and_keeps_it():
    rig = Rig("static_share", num_blocks=1000, static=True)
    static = rig.plan.trainer.static_blocks
    assert static > 0 and rig.inst.lent_blocks == static and rig.ft.held == static
    assert rig.inst.lender is None            # decode cannot reclaim a static carve-out
    rig.add_tasks(2)
    rig.start()
    rig.wait(lambda: rig.ft.sequences_done == 4)
    rig.stop()
    assert rig.ft.version == 1 and rig.inst.lent_blocks == static and rig.ft.held == static


# ------------------------------------------------------------------ decode priority


def test_reclaim_gives_every_block_back_at_once_and_aborts_the_microbatch():
    rig = Rig("harli")
    entered, release, calls = _block_first_forward(rig.runner)
    rig.add_tasks(2)
    rig.start()
    assert entered.wait(30)
    with rig.live.lock:
        held = rig.ft.held
        assert held > 0 and rig.inst.lent_blocks == held and rig.pool.available == 2
        free = rig.inst.free_blocks
        rig.inst._reclaim()                   # what the scheduler does when decode needs the blocks
        assert rig.inst.lent_blocks == 0 and rig.ft.held == 0 and rig.inst.free_blocks == free + held
        assert rig.ft.aborted_microbatches == 1 and rig.ft.taken is None
        assert rig.pool.available == 4        # the sequences are back in the pool
    release.set()                             # the computation stops at its first layer ...
    rig.wait(lambda: rig.ft.sequences_done == 4)    # ... and the sequences are recomputed
    rig.stop()
    assert rig.ft.aborted_microbatches == 1 and rig.ft.micro_batches == 2 and len(calls) == 3
    assert rig.ft.report().counters["finetune_aborted_microbatches"] == 1
    assert sorted(t.id for t in rig.tasks_done) == [100, 101]


def test_a_plan_of_no_micro_batch_at_an_iteration_start_aborts_the_one_in_flight():
    rig = Rig("harli", "slo.tpot_s=1e-9")   # with a decode batch no share meets this SLO
    entered, release, _ = _block_first_forward(rig.runner)
    rig.add_tasks(1)
    rig.start()
    assert entered.wait(30)
    with rig.live.lock:
        r = Request(1, 0.0, 16, 8)
        r.kv_len, r.kv_blocks = 16, 1
        rig.inst.running.append(r)            # a decode batch of one
        rig.inst.kv_total += r.kv_len
        rig.ft.on_iteration(rig.inst, "decode")
        assert rig.ft.aborted_microbatches == 1 and rig.ft.held == 0 and rig.pool.available == 2
        assert rig.ft.plans[-1][4] == 0
        rig.inst.running.clear()
        rig.inst.kv_total = 0
        rig.ft.wake()
    release.set()
    rig.wait(lambda: rig.ft.sequences_done == 2)
    rig.stop()


def test_decode_takes_back_blocks_lent_to_finetuning_without_waiting():
    # 430 blocks (4 kept free): the finetune borrows 400 (two sequences of 200), a 480-token prompt needs 30
    rig = Rig("harli", num_blocks=430, role="both")
    entered, release, _ = _block_first_forward(rig.runner)
    rig.add_tasks(2)
    rig.start(serve=True)
    assert entered.wait(30)
    with rig.live.lock:
        assert rig.inst.lent_blocks == 400 and rig.inst.free_blocks == 30
        rig.inst.enqueue(Request(7, 0.0, 480, 20))
    rig.wait(lambda: rig.ft.aborted_microbatches == 1)
    release.set()
    rig.wait(lambda: len(rig.done) == 1 and rig.ft.sequences_done == 4)
    rig.stop()
    assert rig.done[0].status == "finished" and rig.done[0].preemptions == 0
    assert rig.inst.waits_on_lent_blocks == 0
    assert rig.ft.report().counters["decode_waits_on_finetune_blocks"] == 0


def test_time_sliced_micro_batches_are_all_measured_without_the_time_the_gate_held_them():
    # flexllm beside a decode run: the finetune runs only in serving's pauses, so no micro-batch runs with
    # the instance idle throughout; each is measured as its wall time less the gate's holds
    rig = Rig("flexllm", role="both")
    rig.add_tasks(6)
    rig.start(serve=True)
    with rig.live.lock:
        rig.inst.enqueue(Request(7, 0.0, 64, 60))
    rig.wait(lambda: len(rig.done) == 1)
    rig.stop()
    ft = rig.ft
    assert ft.micro_batches >= 1 and ft.gate.paused_s > 0          # it trained, and was held while serving ran
    assert ft.solo_s[1] == pytest.approx(ft.micro_batches * rig.plan.predictor.lora_step_s(2, SEQ))
    assert 0 < ft.solo_s[0] <= ft.train_busy_s - ft.gate.paused_s + 1e-9


# ------------------------------------------------------------------ failures


def test_an_error_in_the_finetune_computation_is_the_replays_failure():
    rig = Rig("harli")

    def broken(ids, targets=None):
        raise RuntimeError("injected")

    rig.runner.forward = broken
    rig.add_tasks(1)
    rig.start()
    deadline = time.monotonic() + 30
    while not rig.live.stopped and time.monotonic() < deadline:
        time.sleep(0.002)
    assert rig.live.stopped
    assert rig.live.failure == "finetuner 0 on cpu: RuntimeError: injected"
    rig.ft.stop_and_join(10)
    assert not rig.ft.thread.is_alive()


# ------------------------------------------------------------------ the time gate


def _lora_loop(gate_checkpoint, seconds: float) -> tuple[float, float]:
    """Forward + backward of a LoRA model with ``gate_checkpoint`` between layers for ``seconds``;
    returns (this thread's CPU time, wall time)."""
    spec = load_model_spec("tiny")
    runner = LoraTrainingRunner(build_model(spec, seed=0), 4, 8.0)
    handles = layer_checkpoints([*runner.adapted.layers, runner.adapted.lm_head], gate_checkpoint)
    ids = torch.randint(spec.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    torch.autograd.grad(runner.forward(ids), runner.adapter_params)   # warm
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        torch.autograd.grad(runner.forward(ids), runner.adapter_params)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    for h in handles:
        h.remove()
    return cpu, wall


def test_time_share_keeps_the_corunner_busy_at_most_its_share_while_serving_runs():
    share = 0.75
    gate = TimeShare(lambda: True)
    gate.set_share(share)
    gate.begin()
    cpu, wall = _lora_loop(gate.checkpoint, 1.0)
    assert cpu / wall <= (1 - share) + 0.2
    assert gate.paused_s > 0 and gate.charged_s > 0


def test_time_share_never_holds_back_a_corunner_while_serving_is_idle():
    gate = TimeShare(lambda: False)
    gate.set_share(0.9)
    gate.begin()
    _lora_loop(gate.checkpoint, 0.2)
    assert gate.paused_s < 0.05 and gate.charged_s == 0 and gate.busy_s > 0


def test_time_slice_holds_the_corunner_while_serving_runs_and_frees_it_in_the_pauses():
    # 100 ms "iterations", each followed by a 25 ms pause (long beside one layer of the co-runner, which the
    # gate never cuts short)
    fraction, period = 0.2, 0.1
    serving = {"busy": True}
    gate = TimeShare(lambda: serving["busy"])
    gate.set_time_slice(fraction)
    stop = threading.Event()

    def iterations():
        while not stop.is_set():
            serving["busy"] = True
            time.sleep(period)
            serving["busy"] = False
            time.sleep(period * fraction / (1 - fraction))
        serving["busy"] = False

    t = threading.Thread(target=iterations, daemon=True)
    t.start()
    gate.begin()
    try:
        cpu, wall = _lora_loop(gate.checkpoint, 1.5)
    finally:
        stop.set()
        t.join()
    assert cpu / wall <= fraction + 0.2           # it ran (about) only in the pauses
    assert gate.paused_s > 0.5 * wall


def test_gate_knobs_are_checked():
    gate = TimeShare(lambda: True)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            gate.set_share(bad)
        with pytest.raises(ValueError):
            gate.set_time_slice(bad)
