"""The live backend: builds the same layout plan as a simulation, with real models, kernels and threads
instead of the cost model's clock.

What is the same as in the simulator (shared code, not a copy): the plan (GPU groups, memory accounting,
KV budget, every check), the policy object and the views it sees (``LiveInstance`` is a
``BatchScheduler``, co-located nodes are ``colocation.nodes.Node``), the predictor the policy is bound to
(the run's tables), the training data stream, LeMix's placement and memory gate, the learning curve, the
summary and the output files. What is live: the clock (wall time since the replay started), prefill /
decode / mixed iterations, training and finetuning kernels on the real model, weight syncs and KV-cache
hand-offs (a tensor copy between the instances' devices).

What does not run live is refused by :func:`check_live` with a ``ConfigError`` naming the key.
"""
from __future__ import annotations

import heapq
import itertools
import math
import queue
import threading

import numpy as np
import torch

from simcolo.backend import Backend
from simcolo.colocation.nodes import Node, NoPipeline, TrainingPlacement, memory_gate
from simcolo.errors import ConfigError
from simcolo.hardware.cluster import Cluster, Topology
from simcolo.hardware.interference import TableInterference
from simcolo.layout.plan import FinetunePlan, IsolatedTrainingPlan, NodeTrainingPlan
from simcolo.metrics.itl import ITLHistogram
from simcolo.replay.context import LiveContext
from simcolo.replay.live_instance import LiveInstance
from simcolo.serving.system import ServingSystem
from simcolo.training.lora_finetuner import SequencePool

#: LoRA scaling (alpha) of the live finetuner's adapters; costs do not depend on it.
LORA_ALPHA = 32.0


def torch_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device=cuda but torch {torch.__version__} sees no CUDA device; use device=cpu")
        return torch.device("cuda")
    raise ConfigError(f"device={name!r}; expected cpu or cuda")


class LiveClock:
    """The replay's clock as the shared parts see it: ``now`` (wall seconds since the replay started) and
    ``call_at(t, fn)`` (the training data stream's timers), run by the replay's main loop under the lock."""

    def __init__(self, live: LiveContext):
        self.live = live
        self._timers: list = []
        self._seq = itertools.count()
        self.wake: threading.Condition | None = None   # the main loop's; notified when a timer is added

    @property
    def now(self) -> float:
        return self.live.now

    def call_at(self, at: float, fn) -> None:
        with self.live.lock:
            heapq.heappush(self._timers, (at, next(self._seq), fn))
            if self.wake is not None:
                self.wake.notify()

    def next_due(self) -> float:
        return self._timers[0][0] if self._timers else math.inf

    def run_due(self, now: float) -> None:
        """Call every timer due by ``now`` (under the lock)."""
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()


def check_live(run, policy) -> None:
    """Refuse, naming the key, what the live replay cannot run (before anything is planned or loaded)."""
    tp = run.serving.layout.tp
    if policy.layout in ("serving", "isolated") and tp != 1:
        raise ConfigError(f"serving.tp={tp}: tensor parallelism is not run live; the replay serves each "
                          f"replica on one device (serving.tp=1)")
    t = run.training
    if t is not None and t.activation_checkpointing:
        raise ConfigError("training.activation_checkpointing=true is not run live yet; set it to false "
                          "(in the simulation too, so that both run the same work)")
    if t is not None and t.kind == "lora" and policy.layout in ("isolated", "pipelines"):
        raise ConfigError(f"training=lora with policy={policy.name}: LoRA finetuning as a pipeline is simulated "
                          f"only; the live replay finetunes LoRA on decode GPUs (policy=harli, static_share or "
                          f"flexllm) and trains full parameters on pipelines (training=full)")
    n = run.cluster.num_gpus
    if policy.layout == "isolated" and t is not None and (run.node_stages != 1 or policy.serving_gpus != n - 1):
        raise ConfigError(f"policy.serving_gpus={policy.serving_gpus}, training.stages={run.node_stages} with {n} "
                          f"GPUs: the live replay trains one isolated replica on one GPU (training.stages=1, "
                          f"policy.serving_gpus={n - 1})")


class LiveBackend(Backend):
    def __init__(self, run, policy, plan, sink, device: torch.device):
        super().__init__(run, policy, plan)
        self.sink, self.device = sink, device
        self.live = LiveContext(str(device))
        self.env = self.clock = LiveClock(self.live)
        self.cluster = Cluster(self.clock, Topology.from_config(run.gpu, run.cluster))
        self.cluster.apply(plan.allocations)
        self.itl = ITLHistogram()
        self.serving_models: dict[int, torch.nn.Module] = {}
        self.system = ServingSystem(self.clock, self.cluster, run.model, plan.cost, plan, run.serving.batching,
                                    policy, self._on_done, self.itl, make_instance=self._make_instance,
                                    send_kv=self._send_kv)
        if plan.kind == "pipelines":
            self.system.entry_views = self.nodes
            self.system.on_dispatch = self._on_dispatch
        self._transfers: queue.Queue = queue.Queue()
        self._mover = threading.Thread(target=self._move_kv, name="kv-mover", daemon=True)
        self.kv_transfer_s: list[float] = []

    @property
    def now(self) -> float:
        return self.live.now

    def device_of(self, gpu: int) -> torch.device:
        """The torch device standing for cluster GPU ``gpu``: the CPU, or CUDA device ``gpu`` modulo the
        devices present (GPUs beyond them share a device: say so in a comparison)."""
        if self.device.type == "cpu":
            return self.device
        return torch.device("cuda", gpu % torch.cuda.device_count())

    def _make_instance(self, index, role, gpus, cost, batching, num_blocks, on_done, itl, on_prefilled):
        return LiveInstance(index, role, gpus, cost, batching, num_blocks, on_done, itl, on_prefilled,
                            live=self.live, device=self.device_of(gpus[0]))

    # ------------------------------------------------------------------ models, kernels and threads
    def build(self) -> None:
        """Build the real models, runners and trainers (after the checks, which cost nothing)."""
        from simcolo.engine.model import build_model
        from simcolo.engine.runner import ServingRunner

        seed = self.run.seed
        spec, batching = self.model, self.run.serving.batching
        elem = torch.finfo(torch.bfloat16 if self.device.type == "cuda" else torch.float32).bits // 8
        kv_bytes = batching.max_num_seqs * spec.max_context_len * spec.kv_bytes_per_token / spec.dtype_bytes * elem
        budget = self.system.kv_budget.num_blocks * self.system.kv_budget.block_bytes
        if kv_bytes > budget:
            raise ConfigError(f"the live replay keeps each sequence's KV contiguous: serving.max_num_seqs="
                              f"{batching.max_num_seqs} x model.max_context_len={spec.max_context_len} tokens "
                              f"need {kv_bytes / 2**20:,.1f} MiB, but the KV budget per instance is "
                              f"{budget / 2**20:,.1f} MiB; lower serving.max_num_seqs (in the simulation too)")
        for inst in self.system.instances:
            model = build_model(spec, device=inst.device, seed=seed)
            self.serving_models[inst.index] = model
            inst.runner_args = (ServingRunner(model, batching.max_num_seqs, spec.max_context_len), spec.vocab_size)
        self._build_training(self.clock, seed)

    def _pipelines(self, p: NodeTrainingPlan | None) -> None:
        from simcolo.replay.node_pipeline import LiveNodePipeline, stage_models

        per_token = self.plan.prefill_s_per_token
        interference = TableInterference(self.interference)
        if p is None:   # serving alone, on the same layout, routed by the same policy
            S = len(self.system.instances[0].gpus)
            self.nodes += [Node(i, inst, NoPipeline(S), per_token) for i, inst in enumerate(self.system.instances)]
            return
        gate = None
        if p.memory_threshold is not None:
            gate = memory_gate(self.system, self.cluster, p.memory_threshold, lambda: self.live.now)
        t = self.training
        for inst in self.system.instances:
            served = self.serving_models[inst.index]
            devices = [self.device_of(g) for g in inst.gpus]
            pipe = LiveNodePipeline(
                inst.index, stage_models(served, p.stages, devices), devices, list(inst.gpus), self.live,
                list(p.forward_s), list(p.backward_s), list(p.optimizer_s), list(p.activation_bytes), p.global_batch,
                p.release, p.max_inflight, [self.cluster.gpus[g].memory for g in inst.gpus], gate,
                self.model.vocab_size, t.seq_len, self._task_done, self._node_version,
                serving_idle=lambda inst=inst: inst.running_kind is None,
                serving_iterations=lambda inst=inst: inst.iterations)
            inst.training_beside = lambda pipe=pipe: pipe.busy
            self.trainers.append(pipe)
            self.nodes.append(LiveNode(inst.index, inst, pipe, per_token, interference))
        self.placement = TrainingPlacement(self.policy, self.nodes, self.clock)
        self.training_parts = [self.placement]
        self._place = self.placement.place

    def _isolated(self, p: IsolatedTrainingPlan) -> None:
        from simcolo.engine.model import build_model
        from simcolo.engine.runner import TrainingRunner
        from simcolo.replay.train_process import ProcessTrainingWorker, ThreadTrainingWorker
        from simcolo.replay.trainers import LiveIsolatedTrainer

        g = p.groups[0][0]
        dev = self.device_of(g)
        models = [self.serving_models[inst.index] for inst in self.system.instances]
        if self._trainer_process():
            worker = ProcessTrainingWorker(self.model, self.run.seed, self.run.replay.cpu_threads, models)
        else:
            worker = ThreadTrainingWorker(TrainingRunner(build_model(self.model, device=dev, seed=self.run.seed)),
                                          dev, self.live, models, self.model.vocab_size)
        trainer = LiveIsolatedTrainer(0, worker, dev, g, self.live, p.global_batch, self._task_done,
                                      self.records.add, serving=list(self.system.instances), sync_every=p.sync_every)
        trainer.predicted_s = (p.forward_s[0], p.backward_s[0], p.optimizer_s[0])
        self.trainers = [trainer]
        self._place = trainer.place

    def _trainer_process(self) -> bool:
        """``replay.isolated_trainer``: ``process`` | ``thread`` | ``auto`` (a process on the CPU, where
        threads of one interpreter would contend for the GIL as separate GPUs never do)."""
        mode = self.run.replay.isolated_trainer
        return mode == "process" or (mode == "auto" and self.device.type == "cpu")

    def _finetune(self, p: FinetunePlan) -> None:
        from simcolo.engine.runner import LoraTrainingRunner
        from simcolo.replay.finetuner import LiveFinetuner

        self.pool = SequencePool()
        self.training_parts = [self.pool]
        for k, i in enumerate(p.decoders):
            inst = self.system.instances[i]
            runner = LoraTrainingRunner(self.serving_models[i], self.training.rank, LORA_ALPHA)
            ft = LiveFinetuner(k, inst, inst.device, inst.gpus[0], self.live, self.pool, self.policy,
                               self.plan.predictor, runner, p.seq_len, p.global_batch, p.static_blocks,
                               self.model.vocab_size, self._task_done,
                               lambda v, s, e, tokens, k=k: self.records.add(k, v, s, e, p.global_batch, tokens))
            self.trainers.append(ft)
        self._place = self.pool.add

    def warm_up(self, iterations: int) -> None:
        """First calls pay one-off costs (allocator, kernel selection); calibration discards them too."""
        gen = torch.Generator().manual_seed(0)
        for inst in self.system.instances:
            runner, vocab = inst.runner_args
            for i in range(iterations):
                ids = torch.randint(vocab, (64,), generator=gen).to(inst.device)
                runner.prefill([(-1 - i, ids)])
                runner.decode([-1 - i], ids[-1:])
                runner.release(-1 - i)
        t = self.training
        for trainer in self.trainers:
            trainer.warm_up(iterations, t.micro_batch if t is not None else 1, t.seq_len if t is not None else 64)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self.live.start()
        self._mover.start()
        for inst in self.system.instances:
            inst.start(*inst.runner_args)
        for trainer in self.trainers:
            trainer.start()

    def stop(self, timeout_s: float = 60.0) -> list[str]:
        """Stop every thread; returns the names of threads still running a kernel after ``timeout_s``."""
        self.live.stop()
        self._transfers.put(None)
        for x in list(self.system.instances) + self.trainers:
            x.stop_and_join(timeout_s)
        for t in self.trainers:
            t.close()
        threads = [x.thread for x in self.system.instances] + \
            [th for t in self.trainers for th in getattr(t, "threads", [t.thread])]
        return [th.name for th in threads if th.is_alive()]

    # ------------------------------------------------------------------ KV hand-off (disaggregation)
    def _send_kv(self, r, src, dst, link_s: float, arrived) -> None:
        """Under the lock, in the prefill instance's thread: hand the KV copied out of ``src`` to the
        mover thread, which copies it to ``dst``'s device and then delivers it (the copy is the transfer;
        ``link_s`` is the simulator's estimate of it)."""
        self._transfers.put((r, src.outbox.pop(r.id), dst, arrived))

    def _move_kv(self) -> None:
        self.live.run_guarded("KV transfer", self.device, self._mover_loop)

    def _mover_loop(self) -> None:
        live = self.live
        while True:
            job = self._transfers.get()
            if job is None or live.stopped:
                return
            r, (k, v, tokens), dst, arrived = job
            start = live.now
            k, v = k.to(dst.device, copy=True), v.to(dst.device, copy=True)
            live.synchronize(dst.device)
            with live.lock:
                self.kv_transfer_s.append(live.now - start)
                dst.inbox[r.id] = (k, v, tokens)
                arrived()

    # ------------------------------------------------------------------ callbacks (under the lock)
    def _on_done(self, r) -> None:
        self.sink(r)
        self.on_request_finished(r)
        self.on_request_done()

    def on_request_done(self) -> None:
        """Set by the replay loop (wakes it); a no-op until then."""

    # ------------------------------------------------------------------ what the summary reads
    def _busy_by_gpu(self) -> tuple[list[float], list[float]]:
        n = len(self.cluster.gpus)
        train = [0.0] * n
        for t in self.trainers:
            for g, s in t.busy_by_gpu().items():
                train[g] += s
        busy = list(train)
        for inst in self.system.instances:
            for g in inst.gpus:
                busy[g] += inst.busy_s
        return busy, train

    def gpu_busy_s(self) -> list[float]:
        """Serving iterations plus training kernels per GPU (they may overlap: a GPU shared by both is
        counted as busy for each; capped at the run's length by the summary's reader)."""
        return self._busy_by_gpu()[0]

    def train_busy_s(self) -> list[float]:
        return self._busy_by_gpu()[1]

    ITERATION_COLUMNS = ("instance", "prefill_seqs", "prefill_tokens", "decode_seqs", "kv_tokens", "start_s",
                         "end_s", "predicted_s", "training_beside")

    def iterations_frame(self):
        """Every serving iteration of the replay with the cost model's prediction for it."""
        import pandas as pd

        rows = [row for inst in self.system.instances for row in inst.iteration_log]
        df = pd.DataFrame(rows, columns=list(self.ITERATION_COLUMNS))
        return df.astype({c: "int64" for c in self.ITERATION_COLUMNS[:5]} |
                         {c: "float64" for c in self.ITERATION_COLUMNS[5:8]} | {"training_beside": "bool"})

    def kernel_time_ratios(self) -> dict:
        """Measured / predicted time of the serving iterations and training work the replay ran, per
        kind: 1 means the tables held for this run, whatever the machine did since calibration. An
        iteration with training beside it is predicted as the simulator does: its solo time times the
        interference table's slowdown; training counts only work that ran alone (the trainers' ``solo_s``)."""
        df = self.iterations_frame()
        out = {}
        beside_kind = "lora" if self.layout == "finetune" else "train"
        for kind, rows in (("prefill", df[df.prefill_seqs > 0]), ("decode", df[df.prefill_seqs == 0])):
            slowdown = self.interference.slowdown(kind, beside_kind, None)[0] if rows.training_beside.any() else 1.0
            pred = (rows.predicted_s * rows.training_beside.map({True: slowdown, False: 1.0})).sum()
            out[f"replay_{kind}_time_over_table"] = float((rows.end_s - rows.start_s).sum() / pred) if pred > 0 \
                else math.nan
        pred = sum(t.solo_s[1] for t in self.trainers)
        if pred > 0:
            out["replay_train_time_over_table"] = sum(t.solo_s[0] for t in self.trainers) / pred
        if self.kv_transfer_s:
            out["replay_kv_transfer_mean_s"] = float(np.mean(self.kv_transfer_s))
        return out


class LiveNode(Node):
    """A co-located node as the policy sees it in a replay. The one view the live backend cannot read
    off a running GPU is the serving side's progress rate; it is the interference model's, for what
    runs now, as in the simulator."""

    def __init__(self, index, instance, trainer, prefill_s_per_token, interference):
        super().__init__(index, instance, trainer, prefill_s_per_token)
        self._interference = interference

    def serving_rate(self) -> float:
        kind = self.instance.running_kind
        if kind is None or not self.pipeline.busy:
            return 1.0
        return self._interference.rates([kind, "train_forward"])[0]

