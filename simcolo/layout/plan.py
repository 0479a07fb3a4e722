"""The layout plan: from the run's config and its policy, what runs where — computed once, in one pure step.

``plan_layout`` decides, for the layout the policy asks for (``serving``, ``isolated``, ``pipelines``,
``finetune``), the GPU groups and their roles, every memory allocation (weights, serving activations, KV
cache, training state, LoRA adapters), the KV budget, the cost tables and the predictor the policy is
bound to, and what each trainer needs (its GPUs, per-stage costs, links, syncs). Every validation of a
layout lives here, with its clear error. It builds nothing and starts nothing: the simulated backend
(``simcolo.colocation.simulated``) and the live one (``simcolo.replay.backend``) each *build* the plan.

The layouts:

* ``serving`` — instances on every GPU group (``serving.tp``), or prefill/decode disaggregated.
* ``isolated`` — serving on the first ``policy.serving_gpus`` GPUs; ``dp`` data-parallel pipelines of
  ``training.stages`` GPUs train on the rest (synchronous steps, GPipe or 1F1B); weight syncs.
* ``pipelines`` — the cluster cut into nodes of ``training.stages`` GPUs; each node serves one replica
  (costed with the tp=S tables: the node's GPUs serve together) and trains the same replica as an
  S-stage pipeline. Weights count once per GPU (the serving replica is the training replica, as in
  LeMix); gradients, optimizer state and ``max_inflight`` tasks' activations are reserved before the KV
  cache is sized (the largest stage's need, on every GPU of the node).
* ``finetune`` — prefill/decode disaggregated serving (``policy.prefill_instances`` /
  ``decode_instances``, tp 1); a LoRA finetuner on every decode instance borrows its activations from
  the KV block pool (or holds a static carve-out).

A co-location policy with ``training=none`` serves alone on the layout it would train on; its
predictor then assumes the training shape of ``conf/training/none.yaml`` (``NO_TRAINING``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simcolo.config.run import RunConfig
from simcolo.config.training import FullTraining, LoraFinetune
from simcolo.costs import InterferenceTable, TrainingCosts, cost_model_for
from simcolo.costs.cost_model import CostModel
from simcolo.errors import ConfigError
from simcolo.hardware.cluster import Topology
from simcolo.layout.predictor import TablePredictor, TrainingShape
from simcolo.paths import TABLES_DIR, resolve_path
from simcolo.serving.kv_memory import KVBudget
from simcolo.serving.system import ServingLayout
from simcolo.training.memory import StageMemory, full_training_stage_memory, lora_memory, lora_stage_memory

LAYOUTS = ("serving", "isolated", "pipelines", "finetune")
#: The training shape a layout's predictor assumes when nothing trains (conf/training/none.yaml).
NO_TRAINING = TrainingShape(micro_batch=1, seq_len=1024, rank=16, checkpointing=False)
#: Prompt length at which a node's prefill cost per token is read (the policies' queue-wait estimate).
PREFILL_PER_TOKEN_AT = 2048


@dataclass(frozen=True)
class InstancePlan:
    index: int
    role: str                  # both | prefill | decode
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Allocation:
    gpu: int
    use: str                   # weights | activations | kv_cache | train_state | lora_state
    nbytes: float


@dataclass(frozen=True)
class IsolatedTrainingPlan:
    """``dp`` pipelines of S stages on dedicated GPUs, synchronous steps, weight syncs to serving."""
    groups: tuple[tuple[int, ...], ...]
    schedule: str
    forward_s: tuple[float, ...]        # per stage, solo seconds of one task
    backward_s: tuple[float, ...]
    optimizer_s: tuple[float, ...]
    activation_bytes: tuple[float, ...]
    link_s: float                       # activations of one task between adjacent stages
    allreduce_s: float                  # gradients between replicas, per step
    global_batch: int
    sync_every: int                     # optimizer steps between weight syncs
    sync_s: float                       # one weight sync to every serving replica

    @property
    def tasks_per_step(self) -> int:
        return self.global_batch * len(self.groups)


@dataclass(frozen=True)
class NodeTrainingPlan:
    """Every serving instance's GPUs also train that replica as an S-stage pipeline."""
    stages: int
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    optimizer_s: tuple[float, ...]
    activation_bytes: tuple[float, ...]
    link_s: tuple[float, ...]           # per node
    global_batch: int
    max_inflight: int
    release: str                        # the policy's: async | sync
    memory_threshold: float | None      # LeMix's gate (None: no gate)


@dataclass(frozen=True)
class FinetunePlan:
    """A LoRA finetuner on every decode instance (tp 1)."""
    decoders: tuple[int, ...]           # instance indices
    adapter_bytes: float
    activation_bytes_per_sequence: float
    lookahead_iterations: int           # decode iterations advanced between re-plans
    static_blocks: int | None           # a static carve-out of KV blocks (static_share); None: lent on demand
    global_batch: int
    seq_len: int


@dataclass(frozen=True)
class LayoutPlan:
    kind: str
    training: FullTraining | LoraFinetune | None
    serving: ServingLayout              # as the layout adjusts it (tp, instance counts, mode)
    kv: KVBudget
    instances: tuple[InstancePlan, ...]
    allocations: tuple[Allocation, ...]
    cost: CostModel
    interference: InterferenceTable
    predictor: TablePredictor
    trainer: IsolatedTrainingPlan | NodeTrainingPlan | FinetunePlan | None
    prefill_s_per_token: float | None = None   # pipelines: what a node's queued prompt token costs (its view)

    @property
    def training_on(self) -> bool:
        return self.trainer is not None

    @property
    def train_groups(self) -> tuple[tuple[int, ...], ...]:
        """GPU groups that only train (isolated's replicas)."""
        return self.trainer.groups if isinstance(self.trainer, IsolatedTrainingPlan) else ()


def training_table_dir(run: RunConfig):
    """Training tables: ``costs.path`` if set (a calibration), else the tp1 directory (training stages
    are single GPUs)."""
    if run.costs.path is not None:
        return resolve_path(run.costs.path)
    root = resolve_path(run.costs.tables_root) if run.costs.tables_root is not None else TABLES_DIR
    return CostModel.resolve(run.gpu.name, run.model.name, 1, root)


def plan_layout(run: RunConfig, policy, topology: Topology) -> LayoutPlan:
    """The layout ``policy`` asks for on ``topology``, with every check (``ConfigError`` naming the key)."""
    kind = policy.layout
    if kind not in LAYOUTS:
        raise ConfigError(f"policy '{policy.name}' asks for layout '{kind}'; expected one of {LAYOUTS}")
    training = run.training
    if kind == "serving" and training is not None:
        raise ConfigError(f"policy '{policy.name}' only routes requests; training={training.kind} needs a "
                          f"co-location policy: isolated, mix_rr, mix_luf, mix_random, lemix (full) or harli, "
                          f"static_share, flexllm (lora)")
    if kind == "finetune" and training is not None and training.kind != "lora":
        raise ConfigError(f"policy '{policy.name}' finetunes LoRA adapters on decode GPUs (finetune layout) but "
                          f"training.kind is '{training.kind}': use training=lora (full-parameter training of the "
                          f"model does not fit beside a decode instance), or training=none to serve alone")
    return {"serving": _serving, "isolated": _isolated, "pipelines": _pipelines, "finetune": _finetune}[kind](
        run, policy, topology)


# ---------------------------------------------------------------------------- shared steps
def _cost(run: RunConfig, tp: int) -> CostModel:
    return cost_model_for(run.gpu.name, run.model.name, tp, run.costs.path, run.costs.tables_root)


def _interference(run: RunConfig, cost: CostModel) -> InterferenceTable:
    """The interference table of the serving tables' directory (its serving shapes are at the serving tp), scaled
    by the interference dial ``costs.interference_scale``."""
    if run.costs.interference != "table":
        return InterferenceTable.none()
    return InterferenceTable.load(cost.directory).scaled(run.costs.interference_scale)


def _shape(training) -> TrainingShape:
    if training is None:
        return NO_TRAINING
    return TrainingShape(training.micro_batch, training.seq_len, getattr(training, "rank", NO_TRAINING.rank),
                         training.activation_checkpointing, training.kind)


def _predictor(run: RunConfig, cost: CostModel, interference: InterferenceTable, block_bytes: float = 0.0,
               lora_activation_bytes: float | None = None, training_tables: bool = True) -> TablePredictor:
    """``training_tables``: False for serving alone (a calibration may have no training tables)."""
    tc = TrainingCosts.load(training_table_dir(run)) if training_tables else None
    return TablePredictor(cost, tc, interference, _shape(run.training), run.slo.ttft_s, run.slo.tpot_s, block_bytes,
                          lora_activation_bytes, run.model)


def _check_gpu_count(need: int, what: str, have: int, has: str) -> None:
    """A layout asks for more GPUs than it has: say so (naming the keys), before a memory check could
    blame the model. ``has`` says where the ``have`` GPUs come from."""
    if need > have:
        raise ConfigError(f"{what} needs {need} GPU{'s' if need != 1 else ''}, but {has}")


def _cluster_has(topology: Topology) -> str:
    n = topology.num_gpus
    return (f"the cluster has {n} GPU{'s' if n != 1 else ''} (cluster.num_nodes={topology.num_nodes} x "
            f"cluster.gpus_per_node={topology.gpus_per_node})")


def _check_serving_gpus(layout: ServingLayout, have: int, has: str, instance_keys: str = "serving") -> None:
    """The serving instances of ``layout`` fit in ``have`` GPUs (``instance_keys``: the group whose keys set
    the disaggregated instance counts)."""
    tp = layout.tp
    if layout.mode == "colocated":
        count = layout.num_instances or 1
        what = f"serving.tp={tp}" if layout.num_instances is None else \
            f"serving.num_instances={count} x serving.tp={tp}"
    else:
        count = layout.prefill_instances + layout.decode_instances
        what = (f"{instance_keys}.prefill_instances={layout.prefill_instances} + "
                f"{instance_keys}.decode_instances={layout.decode_instances}"
                + (f" with serving.tp={tp}" if instance_keys == "serving" else ""))
    _check_gpu_count(count * tp, what, have, has)


def _instances(run: RunConfig, layout: ServingLayout, topology: Topology, first_gpu: int = 0
               ) -> tuple[InstancePlan, ...]:
    tp = layout.tp
    if layout.mode == "colocated":
        count = layout.num_instances or (topology.num_gpus - first_gpu) // tp
        roles = ["both"] * count
    else:
        if layout.prefill_instances < 1 or layout.decode_instances < 1:
            raise ConfigError("serving.prefill_instances and serving.decode_instances must be >= 1 "
                              "with serving.mode=disaggregated")
        roles = ["prefill"] * layout.prefill_instances + ["decode"] * layout.decode_instances
    groups = topology.allocate_groups(len(roles), tp, first_gpu)
    return tuple(InstancePlan(i, role, tuple(g)) for i, (role, g) in enumerate(zip(roles, groups)))


def _serving_allocations(instances, kv: KVBudget) -> list[Allocation]:
    out = []
    for inst in instances:
        for g in inst.gpus:
            out += [Allocation(g, "weights", kv.weights_bytes), Allocation(g, "activations", kv.activations_bytes),
                    Allocation(g, "kv_cache", kv.num_blocks * kv.block_bytes)]
    return out


def _per_token(cost: CostModel) -> float:
    return cost.prefill_s(PREFILL_PER_TOKEN_AT, 1) / PREFILL_PER_TOKEN_AT


def _stage_memory(run: RunConfig, S: int) -> list[StageMemory]:
    t = run.training
    if t.kind == "lora":
        return [lora_stage_memory(run.model, S, s, t.rank, t.micro_batch, t.seq_len) for s in range(S)]
    return [full_training_stage_memory(run.model, S, s, t.micro_batch, t.seq_len, t.state_bytes_per_param,
                                       t.activation_checkpointing) for s in range(S)]


def _activation_link_s(run: RunConfig, topology: Topology, a: int, b: int) -> float:
    t = run.training
    nbytes = t.micro_batch * t.seq_len * run.model.hidden_size * run.model.dtype_bytes
    return topology.link(a, b).transfer_s(nbytes)


def _check_fits(run: RunConfig, what: str, gpu: int, need: float) -> None:
    cap = run.gpu.memory_bytes
    if need > cap:
        raise ConfigError(f"{what} does not fit GPU {gpu} ({run.gpu.name}, {cap / 1e9:.1f} GB): it needs "
                          f"{need / 1e9:.1f} GB; lower training.state_bytes_per_param, training.micro_batch or "
                          f"training.seq_len, or use more training.stages")


def _plan(run, kind, layout, kv, instances, allocations, cost, interference, predictor, trainer) -> LayoutPlan:
    return LayoutPlan(kind, run.training, layout, kv, instances, tuple(allocations), cost, interference, predictor,
                      trainer, _per_token(cost) if kind == "pipelines" else None)


# ---------------------------------------------------------------------------- the layouts
def _serving(run: RunConfig, policy, topology: Topology) -> LayoutPlan:
    layout, batching = run.serving.layout, run.serving.batching
    _check_serving_gpus(layout, topology.num_gpus, _cluster_has(topology))
    kv = layout.kv_budget(run.model, run.gpu, batching)   # fails early if the model cannot fit
    cost = _cost(run, layout.tp)
    instances = _instances(run, layout, topology)
    interference = InterferenceTable.none()
    return _plan(run, "serving", layout, kv, instances, _serving_allocations(instances, kv), cost, interference,
                 _predictor(run, cost, interference, training_tables=False), None)


def _isolated(run: RunConfig, policy, topology: Topology) -> LayoutPlan:
    t = run.training
    layout, batching = run.serving.layout, run.serving.batching
    n = topology.num_gpus
    serving_gpus = policy.serving_gpus
    S = run.node_stages
    if not 0 < serving_gpus < n:
        raise ConfigError(f"policy.serving_gpus={serving_gpus} must leave GPUs for training: the cluster has {n}")
    dp = (n - serving_gpus) // S
    if dp < 1 or (n - serving_gpus) % S:
        raise ConfigError(f"policy.serving_gpus={serving_gpus} leaves {n - serving_gpus} GPUs, not a multiple "
                          f"of training.stages={S}")
    # serving.num_instances is not read here: the serving GPUs hold as many instances as fit
    _check_serving_gpus(dataclasses.replace(layout, num_instances=None), serving_gpus,
                        f"serving has policy.serving_gpus={serving_gpus}")
    if layout.mode == "colocated":
        layout = dataclasses.replace(layout, num_instances=serving_gpus // layout.tp)
    cost = _cost(run, layout.tp)
    kv = layout.kv_budget(run.model, run.gpu, batching)
    instances = _instances(run, layout, topology)
    allocations = _serving_allocations(instances, kv)
    interference = _interference(run, cost)
    pred = _predictor(run, cost, interference)
    if t is None:
        return _plan(run, "isolated", layout, kv, instances, allocations, cost, interference, pred, None)
    mem = _stage_memory(run, S)
    M = t.global_batch
    groups = topology.allocate_groups(dp, S, serving_gpus) if S <= topology.gpus_per_node else \
        [list(range(serving_gpus + r * S, serving_gpus + (r + 1) * S)) for r in range(dp)]
    for gpus in groups:
        for s, g in enumerate(gpus):
            held = M if t.schedule == "gpipe" else min(S - s, M)
            _check_fits(run, f"training stage {s} of {S} ({t.schedule}, {held} micro-batches in flight)", g,
                        mem[s].weights_bytes + mem[s].state_bytes + held * mem[s].activation_bytes)
            allocations += [Allocation(g, "weights", mem[s].weights_bytes),
                            Allocation(g, "train_state", mem[s].state_bytes)]
    link = max((_activation_link_s(run, topology, g[0], g[1]) if len(g) > 1 else 0.0) for g in groups)
    if dp > 1:
        bw = min(topology.link(groups[0][0], g[0]).bandwidth_bytes_per_s for g in groups[1:])
        allreduce = 2 * (dp - 1) / dp * max(m.trained_bytes for m in mem) / bw
    else:
        allreduce = 0.0
    link0 = topology.link(groups[0][0], 0)
    sync_s = link0.latency_s + len(instances) * sum(m.trained_bytes for m in mem) / link0.bandwidth_bytes_per_s
    trainer = IsolatedTrainingPlan(
        tuple(tuple(g) for g in groups), t.schedule, tuple(pred.task_forward_s(S)), tuple(pred.task_backward_s(S)),
        tuple(pred.stage_costs(S, "optimizer")), tuple(m.activation_bytes for m in mem), link, allreduce, M,
        policy.sync_every, sync_s)
    data = t.data
    if data.kind == "backlog" and 0 < data.backlog < trainer.tasks_per_step:
        raise ConfigError(f"training.data.backlog={data.backlog} is smaller than one isolated step "
                          f"({trainer.tasks_per_step} tasks = training.global_batch x {dp} replicas): "
                          f"training would never start")
    return _plan(run, "isolated", layout, kv, instances, allocations, cost, interference, pred, trainer)


def _pipelines(run: RunConfig, policy, topology: Topology) -> LayoutPlan:
    t = run.training
    S = run.node_stages
    n = topology.num_gpus
    _check_gpu_count(S, f"training.stages={S} (a node of that many GPUs serves with tp={S} and trains {S} "
                        f"pipeline stages)", n, _cluster_has(topology))
    if n % S:
        raise ConfigError(f"training.stages={S} does not divide the cluster's {n} GPUs into nodes")
    layout = dataclasses.replace(run.serving.layout, mode="colocated", tp=S, num_instances=n // S)
    cost = _cost(run, S)
    if t is None:
        kv = layout.kv_budget(run.model, run.gpu, run.serving.batching)
    else:
        mem = _stage_memory(run, S)
        reserve = max(m.state_bytes + t.max_inflight * m.activation_bytes for m in mem)
        kv = layout.kv_budget(run.model, run.gpu, run.serving.batching, reserve,
                              f"training state and {t.max_inflight} tasks' activations")
    instances = _instances(run, layout, topology)
    allocations = _serving_allocations(instances, kv)
    interference = _interference(run, cost)
    pred = _predictor(run, cost, interference)
    if t is None:
        return _plan(run, "pipelines", layout, kv, instances, allocations, cost, interference, pred, None)
    for inst in instances:
        allocations += [Allocation(g, "train_state", mem[s].state_bytes) for s, g in enumerate(inst.gpus)]
    links = tuple(_activation_link_s(run, topology, inst.gpus[0], inst.gpus[1]) if S > 1 else 0.0
                  for inst in instances)
    threshold = policy.memory_threshold
    trainer = NodeTrainingPlan(S, tuple(pred.task_forward_s(S)), tuple(pred.task_backward_s(S)),
                               tuple(pred.stage_costs(S, "optimizer")), tuple(m.activation_bytes for m in mem), links,
                               t.global_batch, t.max_inflight, policy.release,
                               None if threshold is None else float(threshold))
    return _plan(run, "pipelines", layout, kv, instances, allocations, cost, interference, pred, trainer)


def _finetune(run: RunConfig, policy, topology: Topology) -> LayoutPlan:
    t = run.training
    layout = dataclasses.replace(run.serving.layout, mode="disaggregated", tp=1,
                                 prefill_instances=policy.prefill_instances, decode_instances=policy.decode_instances)
    _check_serving_gpus(layout, topology.num_gpus, _cluster_has(topology), "policy")
    cost = _cost(run, 1)
    shape = _shape(t)
    adapter, act = lora_memory(run.model, shape.rank, 1, shape.seq_len)
    if t is None:
        adapter = 0.0
    kv = layout.kv_budget(run.model, run.gpu, run.serving.batching, adapter, "LoRA adapter and its optimizer state")
    instances = _instances(run, layout, topology)
    allocations = _serving_allocations(instances, kv)
    interference = _interference(run, cost)
    pred = _predictor(run, cost, interference, kv.block_bytes, act)
    if t is None:
        return _plan(run, "finetune", layout, kv, instances, allocations, cost, interference, pred, None)
    decoders = tuple(inst.index for inst in instances if inst.role == "decode")
    allocations += [Allocation(instances[i].gpus[0], "lora_state", adapter) for i in decoders]
    static = None
    if policy.static_memory:
        static = pred.lora_blocks(policy.max_micro_batch, t.seq_len)
        # what a decode instance can lend before anything runs: free blocks minus the watermark
        lendable = max(0, kv.num_blocks - int(run.serving.batching.watermark * kv.num_blocks))
        if static > lendable:
            raise ConfigError(f"policy.max_micro_batch={policy.max_micro_batch} needs {static} KV blocks of "
                              f"finetune activations; a decode instance can spare {lendable}")
    trainer = FinetunePlan(decoders, adapter, act, policy.lookahead, static, t.global_batch, t.seq_len)
    return _plan(run, "finetune", layout, kv, instances, allocations, cost, interference, pred, trainer)
