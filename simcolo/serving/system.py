"""The serving side of a cluster: instances on GPU groups, request routing, and (for
prefill/decode disaggregation) the KV-cache hand-off between them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from simcolo.hardware.cluster import Cluster
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.policies.base import RoutingPolicy
from simcolo.serving.batch_scheduler import BatchingConfig
from simcolo.serving.instance import Instance
from simcolo.serving.kv_memory import KVBudget, kv_budget
from simcolo.specs import GPUSpec, ModelSpec
from simcolo.workload.overlength import STATUS as EXCEEDS_CONTEXT
from simcolo.workload.overlength import exceeds_context
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


class ServingSystem:
    def __init__(self, env: SimEnvironment, cluster: Cluster, model: ModelSpec, cost, plan, batching: BatchingConfig,
                 policy: RoutingPolicy, on_done, itl, make_instance=None, send_kv=None):
        """The instances of a layout plan (``layout.plan.LayoutPlan``: their roles, GPUs and KV budget; the
        backend has made the plan's memory allocations). ``make_instance`` builds one instance from
        (index, role, gpus, cost, batching, num_blocks, on_done, itl, on_prefilled): the simulator's
        ``Instance`` by default, the live replay's ``LiveInstance``. ``send_kv(r, src, dst, link_s, arrived)``
        moves a prefilled request's KV cache to a decode instance and calls ``arrived()`` when it is there:
        by default after ``link_s`` simulated seconds (the link's latency + bytes / bandwidth)."""
        self.env, self.cluster, self.model, self.policy = env, cluster, model, policy
        self._on_done = on_done
        self.arrived = 0
        self.done = 0
        self.in_transfer: dict[int, Request] = {}
        self.kv_budget = budget = plan.kv
        if make_instance is None:
            def make_instance(*args):
                return Instance(env, *args)
        self.instances: list = [make_instance(p.index, p.role, list(p.gpus), cost, batching, budget.num_blocks,
                                              self._finished, itl, self._prefilled) for p in plan.instances]
        self.entry = [x for x in self.instances if x.role != "decode"]
        self.decoders = [x for x in self.instances if x.role == "decode"]
        self.entry_views: list = self.entry     # what the policy sees of them (co-located nodes wrap them)
        self.on_dispatch = None                 # called with (request, instance) after routing
        # called before a decode instance is chosen or takes a request and before a timeline sample: a
        # trainer advancing in closed form beside the decode instances brings the KV blocks it has lent up
        # to now (what else it changes is settled when the instance or its GPU is touched)
        self.settle_training: Callable[[], None] | None = None
        self.send_kv = send_kv or self._send_kv_after

    def _send_kv_after(self, r: Request, src, dst, link_s: float, arrived) -> None:
        At(self.env, self.env.now + link_s).callbacks.append(lambda _ev: arrived())

    # -------------------------------------------------------------- request flow
    def dispatch(self, r: Request) -> None:
        """A request arrives: refused if longer than the model's context (as vLLM refuses it), else the
        policy picks the (prefill) instance."""
        self.arrived += 1
        if exceeds_context(r.prompt_tokens, r.output_tokens, self.model.max_context_len):
            r.status = EXCEEDS_CONTEXT
            self._finished(r)
            return
        inst = self.entry[self.policy.route(r, self.entry_views, self.env.now)]
        r.prefill_instance = inst.index
        if self.on_dispatch is not None:
            self.on_dispatch(r, inst)
        inst.enqueue(r)

    def _prefilled(self, r: Request, src: Instance) -> None:
        """Disaggregated: send the request's KV cache to a decode instance over the GPUs' link."""
        if self.settle_training is not None:
            self.settle_training()
        dst = self.decoders[self.policy.route(r, self.decoders, self.env.now)]
        nbytes = r.kv_len * self.model.kv_bytes_per_token / len(src.gpus)  # tp shards move in parallel
        delay = self.cluster.link(src.gpus[0], dst.gpus[0]).transfer_s(nbytes)
        self.in_transfer[r.id] = r
        self.send_kv(r, src, dst, delay, lambda: self._arrive_at_decoder(r, src, dst))

    def _arrive_at_decoder(self, r: Request, src: Instance, dst: Instance) -> None:
        if self.settle_training is not None:
            self.settle_training()
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
