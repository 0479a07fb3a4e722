"""The serving side of a cluster: instances on GPU groups, request routing, and (for
prefill/decode disaggregation) the KV-cache hand-off between them.
"""
from __future__ import annotations

from dataclasses import dataclass

from simcolo.errors import ConfigError
from simcolo.hardware.cluster import Cluster
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.policies.base import RoutingPolicy
from simcolo.serving.batch_scheduler import BatchingConfig
from simcolo.serving.instance import Instance
from simcolo.serving.kv_memory import KVBudget, kv_budget
from simcolo.specs import GPUSpec, ModelSpec
from simcolo.workload.request import Request

MODES = ("colocated", "disaggregated")


@dataclass(frozen=True)
class ServingLayout:
    mode: str
    tp: int
    num_instances: int | None      # colocated; None = fill the cluster
    prefill_instances: int         # disaggregated
    decode_instances: int
    gpu_memory_utilization: float
    num_gpu_blocks_override: int | None

    def kv_budget(self, model: ModelSpec, gpu: GPUSpec, batching: BatchingConfig, reserved_bytes: float = 0.0,
                  reserved_for: str = "") -> KVBudget:
        """Memory per GPU of one instance; raises ConfigError if the model does not fit."""
        batching.validate(model.max_context_len)
        return kv_budget(model, gpu, self.tp, batching.block_size, self.gpu_memory_utilization,
                         batching.max_batched_tokens, batching.max_num_seqs, self.num_gpu_blocks_override,
                         reserved_bytes, reserved_for)

    @classmethod
    def from_cfg(cls, cfg) -> "ServingLayout":
        mode = cfg["mode"]
        if mode not in MODES:
            raise ConfigError(f"serving.mode '{mode}' is unknown; expected one of {MODES}")
        if int(cfg["tp"]) < 1:
            raise ConfigError(f"serving.tp must be >= 1, got {cfg['tp']}")
        n = cfg["num_instances"]
        return cls(mode, int(cfg["tp"]), None if n is None else int(n), int(cfg["prefill_instances"]),
                   int(cfg["decode_instances"]), float(cfg["gpu_memory_utilization"]),
                   None if cfg["num_gpu_blocks_override"] is None else int(cfg["num_gpu_blocks_override"]))


class ServingSystem:
    def __init__(self, env: SimEnvironment, cluster: Cluster, model: ModelSpec, cost, layout: ServingLayout,
                 batching: BatchingConfig, policy: RoutingPolicy, on_done, itl, first_gpu: int = 0,
                 reserved_bytes: float = 0.0, reserved_for: str = "", instance_class: type = Instance):
        """``first_gpu``: instances take GPUs from there on (isolated layouts train on the others);
        ``reserved_bytes``: per GPU, kept out of the KV cache for co-located training;
        ``instance_class``: what runs an instance (the live replay's runs real kernels)."""
        self.env, self.cluster, self.model, self.policy = env, cluster, model, policy
        self._on_done = on_done
        self.arrived = 0
        self.done = 0
        self.in_transfer: dict[int, Request] = {}
        self.kv_budget = budget = layout.kv_budget(model, cluster.spec, batching, reserved_bytes, reserved_for)
        tp = layout.tp
        if layout.mode == "colocated":
            count = layout.num_instances or (len(cluster.gpus) - first_gpu) // tp
            if count < 1:
                raise ConfigError(f"serving.tp={tp} needs more GPUs than the cluster's {len(cluster.gpus)}")
            roles = ["both"] * count
        else:
            if layout.prefill_instances < 1 or layout.decode_instances < 1:
                raise ConfigError("serving.prefill_instances and serving.decode_instances must be >= 1 "
                                  "with serving.mode=disaggregated")
            roles = ["prefill"] * layout.prefill_instances + ["decode"] * layout.decode_instances
        groups = cluster.allocate_groups(len(roles), tp, first_gpu)
        self.instances: list[Instance] = []
        for i, (role, gpus) in enumerate(zip(roles, groups)):
            for g in gpus:
                mem = cluster.gpus[g].memory
                mem.allocate("weights", budget.weights_bytes)
                mem.allocate("activations", budget.activations_bytes)
                mem.allocate("kv_cache", budget.num_blocks * budget.block_bytes)
            self.instances.append(instance_class(env, i, role, gpus, cost, batching, budget.num_blocks,
                                                 self._finished, itl, self._prefilled))
        self.entry = [x for x in self.instances if x.role != "decode"]
        self.decoders = [x for x in self.instances if x.role == "decode"]
        self.entry_views: list = self.entry     # what the policy sees of them (co-located nodes wrap them)
        self.on_dispatch = None                 # called with (request, instance) after routing

    # -------------------------------------------------------------- request flow
    def dispatch(self, r: Request) -> None:
        """A request arrives: the policy picks the (prefill) instance."""
        self.arrived += 1
        inst = self.entry[self.policy.route(r, self.entry_views, self.env.now)]
        r.prefill_instance = inst.index
        if self.on_dispatch is not None:
            self.on_dispatch(r, inst)
        inst.enqueue(r)

    def _prefilled(self, r: Request, src: Instance) -> None:
        """Disaggregated: send the request's KV cache to a decode instance over the GPUs' link."""
        dst = self.decoders[self.policy.route(r, self.decoders, self.env.now)]
        nbytes = r.kv_len * self.model.kv_bytes_per_token / len(src.gpus)  # tp shards move in parallel
        delay = self.cluster.link(src.gpus[0], dst.gpus[0]).transfer_s(nbytes)
        self.in_transfer[r.id] = r
        done = At(self.env, self.env.now + delay)
        done.callbacks.append(lambda _ev: self._arrive_at_decoder(r, src, dst))

    def _arrive_at_decoder(self, r: Request, src: Instance, dst: Instance) -> None:
        del self.in_transfer[r.id]
        src.release_transferred(r)
        dst.enqueue(r)

    def _finished(self, r: Request) -> None:
        self.done += 1
        self._on_done(r)

    # -------------------------------------------------------------- end of run
    def in_flight(self) -> list[Request]:
        """Requests that arrived but neither finished nor were given up on (for a cut-off run)."""
        out = list(self.in_transfer.values())
        for inst in self.instances:
            out += list(inst.waiting) + inst.prefilling + inst.running
        return sorted(out, key=lambda r: r.id)
