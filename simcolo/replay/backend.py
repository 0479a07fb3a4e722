"""The live backend: the layout a policy asks for, built from the same config as a simulation, with
real models, kernels and threads instead of the cost model's clock.

What is the same as in the simulator (and shared code, not a copy): the policy object and the views it
sees (``LiveInstance`` is the simulator's ``Instance``; co-located nodes are ``colocation.nodes.Node``),
the KV budget and memory accounting, the cost predictions the policy is bound to (the run's tables),
the LeMix memory gate, the learning curve and every metric. What is live: the clock (wall time since
the first arrival could happen), prefill/decode/training kernels on the real model, weight syncs.

Supported live (a clear ``ConfigError`` otherwise): colocated serving at ``tp=1`` without chunked
prefill; ``isolated`` with one training replica of one stage; ``pipelines`` (mix_*, lemix) with one
stage per node; training data ``backlog``; no activation checkpointing. Prefill/decode disaggregation and LoRA finetuning (``harli``,
``static_share``, ``flexllm``) are not live yet.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from simcolo.colocation.backend import TrainingRecords, TrainingTally, memory_gate, training_table_dir
from simcolo.colocation.nodes import Node, TrainingPlacement
from simcolo.colocation.predictor import SimPredictor
from simcolo.costs import cost_model_for
from simcolo.costs.interference_table import InterferenceTable
from simcolo.costs.training_costs import TrainingCosts
from simcolo.errors import ConfigError
from simcolo.hardware.cluster import Cluster
from simcolo.hardware.interference import TableInterference
from simcolo.metrics.itl import ITLHistogram
from simcolo.serving.system import ServingLayout, ServingSystem
from simcolo.simulate import batching_from_cfg
from simcolo.specs import gpu_spec_from_mapping, model_spec_from_mapping
from simcolo.training.learning_curve import LearningCurve
from simcolo.training.memory import full_training_stage_memory
from simcolo.replay.context import LiveContext
from simcolo.replay.live_instance import LiveInstance
from simcolo.replay.train_process import ProcessTrainingWorker, ThreadTrainingWorker
from simcolo.replay.trainers import NodeTrainer, SyncTrainer, TaskStream


def torch_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device=cuda but torch {torch.__version__} sees no CUDA device; use device=cpu")
        return torch.device("cuda")
    raise ConfigError(f"device={name!r}; expected cpu or cuda")


class _Clock:
    """What the simulator's parts read of their environment: ``now``."""

    def __init__(self, live: LiveContext):
        self._live = live

    @property
    def now(self) -> float:
        return self._live.now


class LiveBackend(TrainingTally):
    def __init__(self, cfg, policy, sink, device: torch.device):
        self.cfg, self.policy, self.sink, self.device = cfg, policy, sink, device
        self.model = model_spec_from_mapping(cfg["model"], "model")
        self.gpu = gpu_spec_from_mapping(cfg["gpu"], "gpu")
        self.live = LiveContext(str(device))
        self.env = _Clock(self.live)
        c = cfg["cluster"]
        self.cluster = Cluster(self.env, self.gpu, int(c["num_nodes"]), int(c["gpus_per_node"]),
                               float(c["network_bandwidth_bytes_per_s"]), float(c["network_latency_s"]),
                               float(c["nvlink_latency_s"]))
        self.itl = ITLHistogram()
        self.records = TrainingRecords()
        self.kind = policy.layout
        tcfg = cfg["training"]
        self.training_on = tcfg["kind"] != "none" and self.kind != "serving"
        self.learning_curve = LearningCurve.from_cfg(tcfg["learning_curve"])
        self.micro_batch, self.seq_len = int(tcfg["micro_batch"]), int(tcfg["seq_len"])
        self.global_batch = int(tcfg["global_batch"])
        self.trainers: list = []
        self.nodes: list[Node] = []
        self.train_groups: list[list[int]] = []
        self.serving_models: dict[int, torch.nn.Module] = {}
        layout = ServingLayout.from_cfg(cfg["serving"])
        self.batching = batching_from_cfg(cfg["serving"])
        if layout.mode != "colocated" or layout.tp != 1:
            raise ConfigError(f"serving.mode={layout.mode}, serving.tp={layout.tp}: the live replay runs colocated "
                              f"instances of one GPU each (serving.mode=colocated, serving.tp=1)")
        if self.batching.chunked_prefill:
            raise ConfigError("serving.chunked_prefill=true (Sarathi-style mixed batches) is not run live yet: the "
                              "replay's engine prefills whole prompts; use serving=vllm")
        if self.kind == "serving" and tcfg["kind"] != "none":
            raise ConfigError(f"policy '{policy.name}' only routes requests; training={tcfg['kind']} needs a "
                              f"co-location policy")
        if self.training_on and bool(tcfg["activation_checkpointing"]):
            raise ConfigError("training.activation_checkpointing=true is not run live yet; set it to false "
                              "(in the simulation too, so that both run the same work)")
        build = {"serving": self._serving, "isolated": self._isolated, "pipelines": self._pipelines}.get(self.kind)
        if build is None:
            raise ConfigError(f"policy '{policy.name}' ({self.kind} layout: prefill/decode disaggregation with LoRA "
                              f"finetuning) is not supported by the live replay yet; replay isolated, mix_*, lemix "
                              f"or a routing policy")
        self.system = build(layout)

    # ------------------------------------------------------------------ helpers
    def device_of(self, gpu: int) -> torch.device:
        """The torch device simulating cluster GPU ``gpu``: the CPU, or CUDA device ``gpu`` modulo the
        devices present (GPUs beyond them share a device: say so in a comparison)."""
        if self.device.type == "cpu":
            return self.device
        return torch.device("cuda", gpu % torch.cuda.device_count())

    def _instance_factory(self):
        def make(env, index, role, gpus, cost, batching, num_blocks, on_done, itl, on_prefilled):
            return LiveInstance(env, index, role, gpus, cost, batching, num_blocks, on_done, itl, on_prefilled,
                                live=self.live, device=self.device_of(gpus[0]))
        return make

    def _system(self, layout, cost, reserved: float = 0.0, reserved_for: str = "") -> ServingSystem:
        self.cost = cost
        return ServingSystem(self.env, self.cluster, self.model, cost, layout, self.batching, self.policy,
                             self._on_done, self.itl, reserved_bytes=reserved, reserved_for=reserved_for,
                             instance_class=self._instance_factory())

    def _predictor(self, cost) -> SimPredictor:
        """The policy's cost predictions: the run's tables, exactly as the simulator binds them."""
        mode = self.cfg["costs"].get("interference", "table")
        if mode not in ("table", "none"):
            raise ConfigError(f"costs.interference '{mode}' is unknown; expected table or none")
        self.interference = InterferenceTable.load(cost.directory) if mode == "table" else InterferenceTable.none()
        slo = self.cfg["slo"]
        tc = TrainingCosts.load(training_table_dir(self.cfg, self.gpu.name, self.model.name))
        p = SimPredictor(cost, tc, self.interference, self.cfg["training"], float(slo["ttft_s"]), float(slo["tpot_s"]))
        self.policy.bind(p)
        return p

    def _stage_memory(self):
        t = self.cfg["training"]
        return full_training_stage_memory(self.model, 1, 0, self.micro_batch, self.seq_len,
                                          float(t["state_bytes_per_param"]), False)

    def _trainer_process(self) -> bool:
        """``replay.isolated_trainer``: ``process`` | ``thread`` | ``auto`` (a process on the CPU, where
        threads of one interpreter would contend for the GIL as separate GPUs never do)."""
        mode = str(self.cfg["replay"]["isolated_trainer"])
        if mode not in ("auto", "process", "thread"):
            raise ConfigError(f"replay.isolated_trainer={mode!r}; expected auto, process or thread")
        if mode == "process" and self.device.type == "cuda":
            raise ConfigError("replay.isolated_trainer=process runs on the CPU only; use thread or auto with cuda")
        return mode == "process" or (mode == "auto" and self.device.type == "cpu")

    def _one_stage(self) -> None:
        if int(self.cfg["training"]["stages"]) != 1:
            raise ConfigError(f"training.stages={self.cfg['training']['stages']}: the live replay trains one stage "
                              f"per replica (training.stages=1)")

    def _cost(self):
        return cost_model_for(self.gpu.name, self.model.name, 1, self.cfg["costs"]["path"],
                              self.cfg["costs"]["tables_root"])

    # ------------------------------------------------------------------ layouts
    def _serving(self, layout):
        self.interference = InterferenceTable.none()
        return self._system(layout, self._cost())

    def _isolated(self, layout):
        self._one_stage()
        n, serving_gpus = len(self.cluster.gpus), int(self.cfg["policy"]["serving_gpus"])
        if serving_gpus != n - 1:
            raise ConfigError(f"policy.serving_gpus={serving_gpus} with {n} GPUs: the live replay trains one "
                              f"replica on one GPU, so policy.serving_gpus must be {n - 1}")
        system = self._system(dataclasses.replace(layout, num_instances=serving_gpus), self._cost())
        pred = self._predictor(self.cost)
        if not self.training_on:
            return system
        data = self.cfg["training"]["data"]
        if data["kind"] == "backlog" and int(data["backlog"]) < self.global_batch:
            raise ConfigError(f"training.data.backlog={data['backlog']} is smaller than one isolated step "
                              f"(training.global_batch={self.global_batch} tasks): training would never start")
        mem = self._stage_memory()
        g = serving_gpus
        pool = self.cluster.gpus[g].memory
        pool.allocate("weights", mem.weights_bytes)
        pool.allocate("train_state", mem.state_bytes)
        self.train_groups = [[g]]
        self._task_predicted_s = (pred.task_forward_s(1)[0], pred.task_backward_s(1)[0],
                                  pred.stage_costs(1, "optimizer")[0])
        self._place = lambda task: self.trainers[0].place(task)
        self._pending_trainers = [("isolated", g)]
        return system

    def _pipelines(self, layout):
        self._one_stage()
        n = len(self.cluster.gpus)
        layout = dataclasses.replace(layout, mode="colocated", tp=1, num_instances=n)
        mem = self._stage_memory()
        inflight = int(self.cfg["training"]["max_inflight"])
        reserve = mem.state_bytes + inflight * mem.activation_bytes if self.training_on else 0.0
        system = self._system(layout, self._cost(), reserve, f"training state and {inflight} tasks' activations")
        pred = self._predictor(self.cost)
        self._gate = None
        if self.policy.memory_threshold is not None and self.training_on:
            self._gate = memory_gate(system, self.cluster, float(self.policy.memory_threshold), lambda: self.live.now)
        self._stage_s = (pred.task_forward_s(1)[0], pred.task_backward_s(1)[0])
        self._task_predicted_s = (*self._stage_s, pred.stage_costs(1, "optimizer")[0])
        self._activation_bytes = mem.activation_bytes
        system.on_dispatch = self._on_dispatch
        if self.training_on:
            for inst in system.instances:
                self.cluster.gpus[inst.gpus[0]].memory.allocate("train_state", mem.state_bytes)
            self._place = lambda task: self.placement.place(task)
        self._pending_trainers = [("node", inst.index) for inst in system.instances] if self.training_on else []
        return system

    # ------------------------------------------------------------------ models, kernels and threads
    def build(self) -> None:
        """Build the real models and runners (after the config checks, which cost nothing)."""
        from calibrate.model import build_model
        from simcolo.replay.model_runner import ServingRunner, TrainingRunner

        seed = int(self.cfg["seed"])
        spec = self.model
        elem = torch.finfo(torch.bfloat16 if self.device.type == "cuda" else torch.float32).bits // 8
        kv_bytes = self.batching.max_num_seqs * spec.max_context_len * spec.kv_bytes_per_token / spec.dtype_bytes * elem
        budget = self.system.kv_budget.num_blocks * self.system.kv_budget.block_bytes
        if kv_bytes > budget:
            raise ConfigError(f"the live replay keeps each sequence's KV contiguous: serving.max_num_seqs="
                              f"{self.batching.max_num_seqs} x model.max_context_len={spec.max_context_len} tokens "
                              f"need {kv_bytes / 2**30:.1f} GiB, but the KV budget per instance is "
                              f"{budget / 2**30:.1f} GiB; lower serving.max_num_seqs (in the simulation too)")
        self.runners = {}
        for inst in self.system.instances:
            model = build_model(spec, device=inst.device, seed=seed)
            self.serving_models[inst.index] = model
            inst.runner_args = (ServingRunner(model, self.batching.max_num_seqs, spec.max_context_len),
                                spec.vocab_size)
        kw = dict(live=self.live, global_batch=self.global_batch, on_task_done=self._task_done,
                  on_step=self.records.add)
        for kind, where in getattr(self, "_pending_trainers", []):
            if kind == "node":   # trains the module its node serves
                inst = self.system.instances[where]
                model = self.serving_models[where]
                worker = ThreadTrainingWorker(TrainingRunner(model), inst.device, self.live, [], spec.vocab_size)
                trainer = NodeTrainer(where, worker, inst.device, inst.gpus[0], forward_s=self._stage_s[0],
                                      backward_s=self._stage_s[1], instance=inst,
                                      pool=self.cluster.gpus[inst.gpus[0]].memory,
                                      activation_bytes=self._activation_bytes, gate=self._gate, **kw)
                inst.training_beside = lambda t=trainer: t.busy
                self.nodes.append(LiveNode(where, inst, trainer, self.cost.prefill_s(2048, 1) / 2048,
                                           TableInterference(self.interference)))
            else:
                dev = self.device_of(where)
                models = [self.serving_models[inst.index] for inst in self.system.instances]
                if self._trainer_process():
                    worker = ProcessTrainingWorker(spec, seed, int(self.cfg["replay"]["cpu_threads"]), models)
                else:
                    worker = ThreadTrainingWorker(TrainingRunner(build_model(spec, device=dev, seed=seed)), dev,
                                                  self.live, models, spec.vocab_size)
                trainer = SyncTrainer(0, worker, dev, where, serving=list(self.system.instances),
                                      sync_every=int(self.cfg["policy"]["sync_every"]), **kw)
            trainer.predicted_s = self._task_predicted_s
            self.trainers.append(trainer)
        if self.kind == "pipelines":
            self.placement = TrainingPlacement(self.policy, self.nodes, self.env)
            if not self.nodes:   # serving alone on the layout, routed by the same policy
                self.nodes = [Node(i, inst, _NoPipeline(), self.cost.prefill_s(2048, 1) / 2048)
                              for i, inst in enumerate(self.system.instances)]
            self.system.entry_views = self.nodes
        if self.training_on:
            self.stream = TaskStream(self.cfg["training"]["data"], self.micro_batch, self.seq_len, self.live,
                                     self._place)

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
        for trainer in self.trainers:
            trainer.warm_up(iterations, self.micro_batch, self.seq_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self.live.start()
        for inst in self.system.instances:
            inst.start(*inst.runner_args)
        for trainer in self.trainers:
            trainer.start()
        if self.stream is not None:
            with self.live.lock:
                self.stream.start()

    def stop(self, timeout_s: float = 60.0) -> list[str]:
        """Stop every thread; returns the names of threads still running a kernel after ``timeout_s``."""
        self.live.stop()
        for x in list(self.system.instances) + self.trainers:
            x.stop_and_join(timeout_s)
        for t in self.trainers:
            t.worker.close()
        return [x.thread.name for x in list(self.system.instances) + self.trainers if x.thread.is_alive()]

    # ------------------------------------------------------------------ callbacks (under the lock)
    def _on_done(self, r) -> None:
        self.sink(r)
        self.on_request_done()

    def on_request_done(self) -> None:
        """Set by the replay loop (wakes it); a no-op until then."""

    def _on_dispatch(self, r, inst) -> None:
        self.nodes[inst.index].placed(self.live.now, r.prompt_tokens, False)


    # ------------------------------------------------------------------ results
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
        interference table's slowdown; training counts only work that ran with serving idle."""
        df = self.iterations_frame()
        out = {}
        for kind, rows in (("prefill", df[df.prefill_seqs > 0]), ("decode", df[df.prefill_seqs == 0])):
            slowdown = self.interference.slowdown(kind, "train", None)[0] if rows.training_beside.any() else 1.0
            pred = (rows.predicted_s * rows.training_beside.map({True: slowdown, False: 1.0})).sum()
            out[f"replay_{kind}_time_over_table"] = float((rows.end_s - rows.start_s).sum() / pred) if pred > 0 \
                else math.nan
        pred = sum(t.solo_s[1] for t in self.trainers)
        if pred > 0:
            out["replay_train_time_over_table"] = sum(t.solo_s[0] for t in self.trainers) / pred
        return out

    def training_frame(self):
        import pandas as pd

        if not self.training_on:
            return None
        df = pd.DataFrame(self.records.rows, columns=list(TrainingRecords.COLUMNS))
        return df.astype({"trainer": "int64", "version": "int64", "start_s": "float64", "end_s": "float64",
                          "tasks": "int64", "tokens": "int64"})

    def training_summary(self, duration_s: float) -> dict:
        """The simulator's training metrics that a replay measures (same names)."""
        if not self.training_on:
            return {"training_kind": "none", "layout": self.kind}
        d = duration_s
        out = {"training_kind": str(self.cfg["training"]["kind"]), "layout": self.kind,
               "train_tasks_done": self.tasks_done, "train_tokens_per_s": self.tokens_done / d if d > 0 else math.nan,
               "train_samples_per_s": self.tasks_done * self.micro_batch / d if d > 0 else math.nan,
               "optimizer_steps": len(self.records.rows), "train_tasks_created": self.stream.created}
        finished = self.sink.status_is("finished")
        versions = self.sink.column("model_version")[finished]
        out["inference_loss_mean"] = float(self.learning_curve.loss(versions).mean()) if versions.size else math.nan
        out["model_version_mean"] = float(versions.mean()) if versions.size else math.nan
        out["train_busy_frac_mean"] = float(np.mean([t.train_busy_s for t in self.trainers])) / d if d > 0 else math.nan
        if self.kind == "pipelines":
            out["train_deferred_tasks"] = len(self.placement.deferred)
            out["train_queued_tasks"] = sum(t.queued for t in self.trainers)
        else:
            t = self.trainers[0]
            out["weight_syncs"] = t.syncs
            out["weight_sync_mean_s"] = float(np.mean(t.sync_s)) if t.sync_s else math.nan
            out["train_queued_tasks"] = t.queued
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


class _NoPipeline:
    S = 1

    def stage_backlog_s(self, stage: int) -> float:
        return 0.0
