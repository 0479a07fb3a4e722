"""The simulated backend: builds a layout plan on the SimPy clock, with the cost tables' times.

Serving instances are the simulator's ``serving.instance.Instance``; training is ``SyncTrainer``
(isolated), ``NodePipeline`` (co-located pipelines) or ``LoraFinetuner`` (decode GPUs). Training and
serving on one GPU co-run through the GPU's processor-sharing compute with the interference table's
slowdowns. What the plan decided (GPUs, memory, costs, checks) is not decided again here.
"""
from __future__ import annotations

import math

import numpy as np

from simcolo.backend import Backend
from simcolo.colocation.nodes import Node, NoPipeline, TrainingPlacement, memory_gate
from simcolo.hardware.cluster import Cluster, Topology
from simcolo.hardware.interference import TableInterference
from simcolo.layout.plan import FinetunePlan, IsolatedTrainingPlan, NodeTrainingPlan
from simcolo.serving.system import ServingSystem
from simcolo.training.lora_finetuner import LoraFinetuner, SequencePool
from simcolo.training.node_pipeline import NodePipeline
from simcolo.training.sync_trainer import SyncTrainer, WeightSync


class SimBackend(Backend):
    def __init__(self, env, run, policy, plan, on_done, itl, seed: int):
        super().__init__(run, policy, plan)
        self.env = env
        self.arrivals = None
        self.cluster = cluster = Cluster(env, Topology.from_config(run.gpu, run.cluster))
        cluster.apply(plan.allocations)
        if plan.kind != "serving":
            for g in cluster.gpus:
                g.compute.interference = TableInterference(plan.interference)
        self.system = ServingSystem(env, cluster, run.model, plan.cost, plan, run.serving.batching, policy, on_done,
                                    itl)
        self._build_training(env, seed)
        if isinstance(plan.trainer, IsolatedTrainingPlan) and self.stream is not None \
                and self.stream.kind == "backlog":
            self.trainer.recycle = self._tasks_recycled   # a backlog replaces each task done at once

    @property
    def now(self) -> float:
        return self.env.now

    # ------------------------------------------------------------------ isolated
    def _isolated(self, p: IsolatedTrainingPlan) -> None:
        gpus = self.cluster.gpus
        self.trainer = SyncTrainer(self.env, [[gpus[g] for g in grp] for grp in p.groups], list(p.forward_s),
                                   list(p.backward_s), list(p.optimizer_s), list(p.activation_bytes), p.link_s,
                                   p.allreduce_s, p.global_batch, p.schedule, self._task_done, self._sync_step,
                                   p.sync_every, None if self.run.sim.training_spans else 1)
        self.trainers = [self.trainer]
        self.weight_sync = WeightSync(self.env, self.system.instances, p.sync_every, p.sync_s)
        self.training_parts = [self.weight_sync]
        self._place = self.trainer.place

    def _sync_step(self, version, start, end, tasks, tokens):
        self.records.add(0, version, start, end, tasks, tokens)
        self.weight_sync.on_version(version)

    # ------------------------------------------------------------------ co-located pipelines
    def _pipelines(self, p: NodeTrainingPlan | None) -> None:
        system, gpus = self.system, self.cluster.gpus
        system.entry_views = self.nodes
        system.on_dispatch = self._on_dispatch
        per_token = self.plan.prefill_s_per_token
        if p is None:   # serving alone, on the same layout, routed by the same policy
            S = len(system.instances[0].gpus)
            self.nodes += [Node(i, inst, NoPipeline(S), per_token) for i, inst in enumerate(system.instances)]
            return
        for inst in system.instances:
            inst.attach([gpus[g].compute for g in inst.gpus])
        gate = None
        if p.memory_threshold is not None:
            gate = memory_gate(system, self.cluster, p.memory_threshold, lambda: self.env.now)
        cycles = self.run.sim.training_spans and self.training.data.kind == "backlog"
        for i, inst in enumerate(system.instances):
            pipe = NodePipeline(self.env, i, [gpus[g] for g in inst.gpus], list(p.forward_s), list(p.backward_s),
                                list(p.optimizer_s), list(p.activation_bytes), p.link_s[i], p.global_batch, p.release,
                                p.max_inflight, self._task_done, self._node_version, gate,
                                host=self if cycles else None)
            self.trainers.append(pipe)
            self.nodes.append(Node(i, inst, pipe, per_token))
        self.placement = TrainingPlacement(self.policy, self.nodes, self.env)
        self.training_parts = [self.placement]
        self._place = self.placement.place
        if cycles:
            system.settle_training = lambda: [pipe.show(self.env.now) for pipe in self.trainers]

    # the pipelines' CycleHost (training.node_pipeline): idle cycles advanced in closed form
    def closed_loops(self) -> bool:
        return self.placement.serving_nothing()

    def horizon_s(self) -> float:
        """The next request's arrival, or the run's time limit if sooner (``watch_arrivals``)."""
        nxt = self.arrivals.next_s if self.arrivals is not None else math.inf
        limit = self.run.sim.max_time_s
        return nxt if limit is None else min(nxt, float(limit))

    def watch_arrivals(self, arrivals) -> None:
        """The request feed whose next arrival bounds cycles advanced in closed form."""
        self.arrivals = arrivals

    def credit_cycles(self, pipe: NodePipeline, cycles, tasks: int, first_version: int) -> None:
        self._tasks_recycled(tasks)
        t = self.training
        node = self.nodes[pipe.index]
        node.placed_repeatedly(node.last_arrival_s + cycles.k * cycles.period_s, t.micro_batch * t.seq_len, tasks)
        ends = cycles.step_ends()
        if len(ends):
            self.records.add_steps(pipe.index, first_version, np.full(len(ends), np.nan), ends, t.global_batch,
                                   np.full(len(ends), t.global_batch * t.micro_batch * t.seq_len))
        self.system.instances[pipe.index].model_version = pipe.version

    # ------------------------------------------------------------------ LoRA finetuning on decode GPUs
    def _finetune(self, p: FinetunePlan) -> None:
        self.pool = SequencePool()
        if self.training.data.kind == "backlog":
            self.pool.recycle = self._tasks_recycled   # a backlog replaces each task done at once
        self.training_parts = [self.pool]
        self.finetuners = []
        for i in p.decoders:
            inst = self.system.instances[i]
            gpu = self.cluster.gpus[inst.gpus[0]]
            inst.attach([gpu.compute])
            inst.max_horizon = p.lookahead_iterations
            k = len(self.finetuners)
            ft = LoraFinetuner(self.env, inst, gpu, self.pool, self.policy, self.plan.predictor, p.seq_len,
                               p.global_batch, p.static_blocks is not None, self._task_done,
                               lambda v, s, e, tokens, k=k: self.records.add(k, v, s, e, p.global_batch, tokens),
                               lambda v, s, e, tokens, k=k: self.records.add_steps(k, v, s, e, p.global_batch, tokens),
                               chains=self.run.sim.training_spans)
            if p.static_blocks is not None:
                ft.reserve_static(p.static_blocks)
            self.finetuners.append(ft)
        self.trainers = list(self.finetuners)
        self._place = self.pool.add
        self.system.settle_training = lambda: self.pool.settle_chains(self.env.now, blocks_only=True)

    # ------------------------------------------------------------------ what the summary reads
    def gpu_busy_s(self) -> list[float]:
        """Busy seconds per GPU: the shared compute's clock where co-location attached it, else the
        instance's own busy time (serving-only GPUs never go through the shared compute)."""
        busy = [g.compute.busy_s for g in self.cluster.gpus]
        for inst in self.system.instances:
            if not inst.attached:
                for g in inst.gpus:
                    busy[g] = max(busy[g], inst.busy_s)
        return busy

    def train_busy_s(self) -> list[float]:
        return [g.compute.train_busy_s for g in self.cluster.gpus]

    def close(self, now: float) -> None:
        for trainer in self.trainers:
            trainer.close(now)
