"""Build the layout a policy asks for and wire training to serving on the simulated cluster.

* ``isolated`` — serving instances on the first ``policy.serving_gpus`` GPUs; ``dp`` pipelines of
  ``training.stages`` GPUs train on the rest (synchronous steps, GPipe or 1F1B); weight syncs.
* ``pipelines`` — the cluster is cut into nodes of ``training.stages`` GPUs; each node serves one replica
  (costed with the tp=S tables: the node's GPUs serve together) and trains the same replica as an
  S-stage pipeline. Weights are counted once per GPU (the serving replica is the training replica, as
  in LeMix); gradients, optimizer state and ``max_inflight`` tasks' activations are reserved before
  the KV cache is sized (the largest stage's need, on every GPU of the node).
* ``finetune`` — prefill/decode disaggregated serving (``policy.prefill_instances`` / ``decode_instances``,
  tp 1); a LoRA finetuner on every decode instance borrows its activations from the KV block pool.

Training and serving on one GPU co-run through the GPU's processor-sharing compute with the
interference table's slowdowns.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from simcolo.colocation.nodes import Node, TrainingPlacement
from simcolo.colocation.predictor import SimPredictor
from simcolo.costs import cost_model_for
from simcolo.costs.interference_table import InterferenceTable
from simcolo.costs.training_costs import TrainingCosts
from simcolo.errors import ConfigError
from simcolo.hardware.interference import TableInterference
from simcolo.paths import TABLES_DIR, resolve_path
from simcolo.serving.system import ServingSystem
from simcolo.training.data import TrainingStream
from simcolo.training.learning_curve import LearningCurve
from simcolo.training.lora_finetuner import LoraFinetuner, SequencePool
from simcolo.training.memory import full_training_stage_memory, lora_memory
from simcolo.training.node_pipeline import NodePipeline
from simcolo.training.schedules import SCHEDULES
from simcolo.training.sync_trainer import SyncTrainer, WeightSync

@dataclass
class TrainingRecords:
    """One row per optimizer step: when, which trainer, the version it made, what it trained.

    ``start_s`` is when the step's work began for isolated steps and finetune steps; a co-located
    node's steps overlap (tasks stream through its pipeline), so there it is NaN."""
    rows: list[tuple] = field(default_factory=list)
    COLUMNS = ("trainer", "version", "start_s", "end_s", "tasks", "tokens")

    def add(self, trainer: int, version: int, start_s: float, end_s: float, tasks: int, tokens: int) -> None:
        self.rows.append((trainer, version, start_s, end_s, tasks, tokens))


def training_table_dir(cfg, gpu_name: str, model_name: str):
    """Training tables: ``costs.path`` if set (a calibration), else the tp1 directory (training stages
    are single GPUs). The interference table comes from the serving tables' directory."""
    if cfg["costs"]["path"] is not None:
        return resolve_path(cfg["costs"]["path"])
    root = resolve_path(cfg["costs"]["tables_root"]) if cfg["costs"]["tables_root"] is not None else TABLES_DIR
    from simcolo.costs.cost_model import CostModel
    return CostModel.resolve(gpu_name, model_name, 1, root)


def memory_gate(system, cluster, threshold: float, now):
    """LeMix's gate: a stage starts a forward only if the GPU's memory in use (weights, training
    state, serving activations, KV blocks *in use*, training activations held) plus the new
    activations stays under ``threshold`` of capacity. ``now()`` is the backend's clock."""
    inst_of = {g: inst for inst in system.instances for g in inst.gpus}
    block_bytes = system.kv_budget.block_bytes

    def gate(g: int, nbytes: float) -> bool:
        pool = cluster.gpus[g].memory
        inst = inst_of[g]
        kv_unused = (inst.num_blocks - inst.kv_blocks_used(now())) * block_bytes
        return pool.used - kv_unused + nbytes <= threshold * pool.capacity
    return gate


class TrainingTally:
    """What both backends (simulated and live) do when a training task finishes: count it, let the data
    stream replace or retire it, and offer the tasks the policy deferred again."""

    tasks_done = 0
    tokens_done = 0
    stream = None
    placement = None   # a TrainingPlacement (co-located pipelines only)

    def _task_done(self, task) -> None:
        self.tasks_done += 1
        self.tokens_done += task.tokens
        self.stream.task_done(task)
        if self.placement is not None:
            self.placement.retry()


class Colocation(TrainingTally):
    """Everything training adds to a run; ``system`` is the serving side it built for the layout."""

    def __init__(self, env, cluster, model, gpu, cfg, policy, layout, batching, sink, itl, seed):
        self.env, self.cluster, self.model, self.gpu, self.cfg = env, cluster, model, gpu, cfg
        self.policy, self.kind = policy, policy.layout
        self.training_on = cfg["training"]["kind"] != "none"
        self.records = TrainingRecords()
        self.trainers: list = []
        self.nodes: list[Node] = []
        self.weight_sync: WeightSync | None = None
        self.finetuners: list[LoraFinetuner] = []
        self.train_groups: list[list[int]] = []    # GPUs of each training replica (isolated)
        tcfg = cfg["training"]
        slo = cfg["slo"]
        self.learning_curve = LearningCurve.from_cfg(tcfg["learning_curve"])
        table_dir = training_table_dir(cfg, gpu.name, model.name)
        self.training_costs = TrainingCosts.load(table_dir)
        self.micro_batch, self.seq_len = int(tcfg["micro_batch"]), int(tcfg["seq_len"])
        self.global_batch = int(tcfg["global_batch"])
        for key in ("micro_batch", "seq_len", "global_batch", "stages", "max_inflight"):
            if int(tcfg[key]) < 1:
                raise ConfigError(f"training.{key} must be >= 1, got {tcfg[key]}")
        wanted = "lora" if self.kind == "finetune" else "full"
        if self.training_on and tcfg["kind"] != wanted:
            raise ConfigError(f"policy '{policy.name}' trains {'LoRA adapters' if wanted == 'lora' else 'full parameters'}"
                              f" ({self.kind} layout) but training.kind is '{tcfg['kind']}': use training={wanted} "
                              f"(or training=none to serve alone on this layout)")
        if self.kind == "finetune" and tcfg["activation_checkpointing"]:
            raise ConfigError("training.activation_checkpointing=true is not modelled for LoRA finetuning "
                              "(policies harli, static_share, flexllm); set it to false")
        builder = {"isolated": self._isolated, "pipelines": self._pipelines, "finetune": self._finetune}[self.kind]
        self.system = builder(cfg, layout, batching, sink, itl, float(slo["ttft_s"]), float(slo["tpot_s"]))
        self.stream = TrainingStream(env, tcfg["data"], self.micro_batch, self.seq_len, seed, self._place) \
            if self.training_on else None

    # ------------------------------------------------------------------ helpers
    def _predictor(self, cost, ttft, tpot, block_bytes=0.0) -> SimPredictor:
        """Cost predictions for the policy; also loads the interference table of the serving tables'
        directory (its serving shapes are at the serving tp) and puts it on every GPU."""
        mode = self.cfg["costs"].get("interference", "table")
        if mode == "table":
            self.interference = InterferenceTable.load(cost.directory)
        elif mode == "none":
            self.interference = InterferenceTable.none()
        else:
            raise ConfigError(f"costs.interference '{mode}' is unknown; expected table or none")
        for g in self.cluster.gpus:
            g.compute.interference = TableInterference(self.interference)
        p = SimPredictor(cost, self.training_costs, self.interference, self.cfg["training"], ttft, tpot,
                         block_bytes)
        self.policy.bind(p)
        return p

    def _stage_memory(self, S: int):
        st = self.cfg["training"]
        return [full_training_stage_memory(self.model, S, s, self.micro_batch, self.seq_len,
                                           float(st["state_bytes_per_param"]), bool(st["activation_checkpointing"]))
                for s in range(S)]

    def _link_s(self, a: int, b: int) -> float:
        nbytes = self.micro_batch * self.seq_len * self.model.hidden_size * self.model.dtype_bytes
        return self.cluster.link(a, b).transfer_s(nbytes)

    def _check_fits(self, what: str, gpu: int, need: float) -> None:
        cap = self.gpu.memory_bytes
        if need > cap:
            raise ConfigError(f"{what} does not fit GPU {gpu} ({self.gpu.name}, {cap / 1e9:.1f} GB): it needs "
                              f"{need / 1e9:.1f} GB; lower training.state_bytes_per_param, training.micro_batch or "
                              f"training.seq_len, or use more training.stages")

    # ------------------------------------------------------------------ isolated
    def _isolated(self, cfg, layout, batching, sink, itl, ttft, tpot):
        tcfg, pcfg = cfg["training"], cfg["policy"]
        n = len(self.cluster.gpus)
        serving_gpus = int(pcfg["serving_gpus"])
        S = int(tcfg["stages"])
        if not 0 < serving_gpus < n:
            raise ConfigError(f"policy.serving_gpus={serving_gpus} must leave GPUs for training: the cluster has {n}")
        dp = (n - serving_gpus) // S
        if dp < 1 or (n - serving_gpus) % S:
            raise ConfigError(f"policy.serving_gpus={serving_gpus} leaves {n - serving_gpus} GPUs, not a multiple "
                              f"of training.stages={S}")
        if layout.mode == "colocated":
            layout = dataclasses.replace(layout, num_instances=serving_gpus // layout.tp)
        elif (layout.prefill_instances + layout.decode_instances) * layout.tp > serving_gpus:
            raise ConfigError(f"serving needs {(layout.prefill_instances + layout.decode_instances) * layout.tp} "
                              f"GPUs but policy.serving_gpus={serving_gpus}")
        cost = cost_model_for(self.gpu.name, self.model.name, layout.tp, cfg["costs"]["path"], cfg["costs"]["tables_root"])
        self.cost = cost
        system = ServingSystem(self.env, self.cluster, self.model, cost, layout, batching, self.policy, sink, itl)
        pred = self._predictor(cost, ttft, tpot)
        if not self.training_on:
            return system
        mem = self._stage_memory(S)
        schedule = str(tcfg["schedule"])
        if schedule not in SCHEDULES:
            raise ConfigError(f"training.schedule '{schedule}' is unknown; expected one of {sorted(SCHEDULES)}")
        M = self.global_batch
        groups = self.cluster.allocate_groups(dp, S, serving_gpus) if S <= self.cluster.gpus_per_node else \
            [list(range(serving_gpus + r * S, serving_gpus + (r + 1) * S)) for r in range(dp)]
        for gpus in groups:
            for s, g in enumerate(gpus):
                held = M if schedule == "gpipe" else min(S - s, M)
                self._check_fits(f"training stage {s} of {S} ({schedule}, {held} micro-batches in flight)", g,
                                 mem[s].weights_bytes + mem[s].state_bytes + held * mem[s].activation_bytes)
                pool = self.cluster.gpus[g].memory
                pool.allocate("weights", mem[s].weights_bytes)
                pool.allocate("train_state", mem[s].state_bytes)
        self.train_groups = groups
        link = max((self._link_s(g[0], g[1]) if len(g) > 1 else 0.0) for g in groups)
        stage_params = [m.weights_bytes for m in mem]
        if dp > 1:
            bw = min(self.cluster.link(groups[0][0], g[0]).bandwidth_bytes_per_s for g in groups[1:])
            allreduce = 2 * (dp - 1) / dp * max(stage_params) / bw
        else:
            allreduce = 0.0
        self.trainer = SyncTrainer(
            self.env, [[self.cluster.gpus[g] for g in gpus] for gpus in groups], pred.task_forward_s(S),
            pred.task_backward_s(S), pred.stage_costs(S, "optimizer"), [m.activation_bytes for m in mem], link,
            allreduce, M, schedule, self._task_done, self._sync_step)
        self.trainers = [self.trainer]
        link0 = self.cluster.link(groups[0][0], 0)
        sync_s = link0.latency_s + len(system.instances) * self.model.weight_bytes / link0.bandwidth_bytes_per_s
        self.weight_sync = WeightSync(self.env, system.instances, int(pcfg["sync_every"]), sync_s)
        self._place = self.trainer.place
        data = tcfg["data"]
        if data["kind"] == "backlog" and 0 < int(data["backlog"]) < self.trainer.tasks_per_step:
            raise ConfigError(f"training.data.backlog={data['backlog']} is smaller than one isolated step "
                              f"({self.trainer.tasks_per_step} tasks = training.global_batch x {dp} replicas): "
                              f"training would never start")
        return system

    def _sync_step(self, version, start, end, tasks, tokens):
        self.records.add(0, version, start, end, tasks, tokens)
        self.weight_sync.on_version(version)

    # ------------------------------------------------------------------ co-located pipelines
    def _pipelines(self, cfg, layout, batching, sink, itl, ttft, tpot):
        tcfg = cfg["training"]
        S = int(tcfg["stages"])
        n = len(self.cluster.gpus)
        if n % S:
            raise ConfigError(f"training.stages={S} does not divide the cluster's {n} GPUs into nodes")
        layout = dataclasses.replace(layout, mode="colocated", tp=S, num_instances=n // S)
        cost = cost_model_for(self.gpu.name, self.model.name, S, cfg["costs"]["path"], cfg["costs"]["tables_root"])
        self.cost = cost
        mem = self._stage_memory(S)
        inflight = int(tcfg["max_inflight"])
        reserve = max(m.state_bytes + inflight * m.activation_bytes for m in mem) if self.training_on else 0.0
        system = ServingSystem(self.env, self.cluster, self.model, cost, layout, batching, self.policy, sink, itl,
                               reserved_bytes=reserve, reserved_for=f"training state and {inflight} tasks' activations")
        pred = self._predictor(cost, ttft, tpot)
        per_token = cost.prefill_s(2048, 1) / 2048
        if not self.training_on:   # serving alone, on the same layout, routed by the same policy
            self.nodes = [Node(i, inst, _NoPipeline(S), per_token) for i, inst in enumerate(system.instances)]
            system.entry_views = self.nodes
            system.on_dispatch = self._on_dispatch
            return system
        for inst in system.instances:
            for s, g in enumerate(inst.gpus):
                self.cluster.gpus[g].memory.allocate("train_state", mem[s].state_bytes)
            inst.attach([self.cluster.gpus[g].compute for g in inst.gpus])
        gate = None
        if self.policy.memory_threshold is not None:
            threshold = float(self.policy.memory_threshold)
            gate = memory_gate(system, self.cluster, threshold, lambda: self.env.now)
        for i, inst in enumerate(system.instances):
            gpus = [self.cluster.gpus[g] for g in inst.gpus]
            link = self._link_s(inst.gpus[0], inst.gpus[1]) if S > 1 else 0.0
            pipe = NodePipeline(self.env, i, gpus, pred.task_forward_s(S), pred.task_backward_s(S),
                                pred.stage_costs(S, "optimizer"), [m.activation_bytes for m in mem], link,
                                self.global_batch, self.policy.release, inflight, self._task_done,
                                self._node_version, gate)
            self.trainers.append(pipe)
            self.nodes.append(Node(i, inst, pipe, per_token))
        system.entry_views = self.nodes
        system.on_dispatch = self._on_dispatch
        self.placement = TrainingPlacement(self.policy, self.nodes, self.env)
        self._place = self.placement.place
        return system

    def _on_dispatch(self, r, inst) -> None:
        self.nodes[inst.index].placed(self.env.now, r.prompt_tokens, False)

    def _node_version(self, pipe) -> None:
        self.nodes[pipe.index].instance.model_version = pipe.version
        self.records.add(pipe.index, pipe.version, math.nan, self.env.now, self.global_batch,
                         self.global_batch * self.micro_batch * self.seq_len)

    # ------------------------------------------------------------------ LoRA finetuning on decode GPUs
    def _finetune(self, cfg, layout, batching, sink, itl, ttft, tpot):
        pcfg, tcfg = cfg["policy"], cfg["training"]
        layout = dataclasses.replace(layout, mode="disaggregated", tp=1,
                                     prefill_instances=int(pcfg["prefill_instances"]),
                                     decode_instances=int(pcfg["decode_instances"]))
        cost = cost_model_for(self.gpu.name, self.model.name, 1, cfg["costs"]["path"], cfg["costs"]["tables_root"])
        self.cost = cost
        rank = int(tcfg["rank"])
        adapter, act = lora_memory(self.model, rank, 1, self.seq_len)
        if not self.training_on:
            adapter = 0.0
        system = ServingSystem(self.env, self.cluster, self.model, cost, layout, batching, self.policy, sink, itl,
                               reserved_bytes=adapter, reserved_for="LoRA adapter and its optimizer state")
        pred = self._predictor(cost, ttft, tpot, system.kv_budget.block_bytes)
        pred.set_lora_activation(act)
        self.pool = SequencePool()
        if not self.training_on:
            return system
        for inst in system.decoders:
            gpu = self.cluster.gpus[inst.gpus[0]]
            gpu.memory.allocate("lora_state", adapter)
            inst.attach([gpu.compute])
            inst.max_horizon = int(pcfg["lookahead_iterations"])
            ft = LoraFinetuner(self.env, inst, gpu, self.pool, self.policy, pred, self.seq_len, self.global_batch,
                               self.policy.static_memory, self._task_done,
                               lambda v, s, e, tokens, i=len(self.finetuners):
                                   self.records.add(i, v, s, e, self.global_batch, tokens))
            if self.policy.static_memory:
                blocks = pred.lora_blocks(int(pcfg["max_micro_batch"]), self.seq_len)
                if blocks > inst.lendable_blocks():
                    raise ConfigError(f"policy.max_micro_batch={pcfg['max_micro_batch']} needs {blocks} KV blocks of "
                                      f"finetune activations; decode instance {inst.index} can spare "
                                      f"{inst.lendable_blocks()}")
                ft.reserve_static(blocks)
            self.finetuners.append(ft)
        self._place = self.pool.add
        return system

    @property
    def deferred(self) -> list:
        """Training tasks the policy has deferred and not yet placed."""
        return self.placement.deferred if self.placement is not None else []

    def close(self, now: float) -> None:
        """End of the run: pipelines count the time they are still busy (for the bubble rate)."""
        for trainer in self.trainers:
            if isinstance(trainer, NodePipeline):
                trainer.close(now)

    # ------------------------------------------------------------------ the training stream

    def on_request_arrival(self) -> None:
        if self.stream is not None:
            self.stream.on_request_arrival()

    def on_request_finished(self, r) -> None:
        if r.status == "finished" and self.stream is not None:
            self.stream.on_request_finished(r.prompt_tokens + r.output_tokens)


class _NoPipeline:
    """The training side of a node that trains nothing (``training=none``): no backlog."""

    def __init__(self, num_stages: int):
        self.S = num_stages

    def stage_backlog_s(self, stage: int) -> float:
        return 0.0
