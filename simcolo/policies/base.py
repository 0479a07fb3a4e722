"""The small interfaces every policy implements.

A policy sees a clock, read-only *views* of the cluster (serving instances, co-located nodes,
finetune state) and a *predictor* of costs, and returns decisions. It never learns whether a simulated
or a live backend runs it: views and predictors are plain protocols that either backend provides.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Protocol, Sequence

from simcolo.workload.request import Request


class InstanceView(Protocol):
    index: int
    role: str
    num_blocks: int

    def outstanding_tokens(self, now: float) -> int: ...

    def kv_blocks_used(self, now: float) -> int: ...


class NodeView(InstanceView, Protocol):
    """A co-located node: one serving replica and one training pipeline on the same S GPUs."""

    num_stages: int
    last_arrival_s: float          # last task (request or training) placed here; -inf if none

    def stage_backlogs_s(self) -> list[float]:
        """Solo seconds of training work placed on each stage and not yet done."""

    def serving_wait_s(self, now: float) -> float:
        """Predicted time before a new request's prefill starts (queued prompts)."""

    def serving_rate(self) -> float:
        """Rate serving iterations progress at now (1 alone; < 1 beside training)."""

    def decode_load(self) -> tuple[int, int]:
        """(sequences on the serving instance, running or queued; KV tokens of the running ones)."""

    def queue_blocked(self) -> bool:
        """Requests are queued and the next cannot be admitted now (sequence, token or KV limit)."""

    def length_stats(self, training: bool) -> tuple[int, float, float]:
        """(count, mean, std) of the lengths of the tasks of that type placed here."""


class FinetuneState(NamedTuple):
    """What a finetune policy sees of one decode instance (read-only, backend-neutral; a named tuple:
    the finetuners build one per plan, twice per micro-batch)."""
    decode_batch: int
    decode_kv_tokens: int
    lendable_blocks: int      # KV blocks it could borrow now (beyond what it holds)
    held_blocks: int


class CostPredictor(Protocol):
    """Cost-model predictions a policy may use (the simulator's tables, or a live backend's)."""

    tpot_slo_s: float
    ttft_slo_s: float
    seq_len: int          # tokens per training sequence

    def task_forward_s(self, num_stages: int) -> list[float]: ...

    def task_backward_s(self, num_stages: int) -> list[float]: ...

    def request_prefill_s(self, prompt_tokens: int) -> float: ...

    def decode_solo_s(self, batch: int, kv_tokens: int) -> float: ...

    def decode_corun_s(self, batch: int, kv_tokens: int, share: float | None) -> float: ...

    def decode_slowdown(self, share: float | None) -> float: ...

    def lora_rate(self, share: float | None) -> float: ...

    def lora_step_s(self, micro_batch: int, seq_len: int) -> float: ...

    def lora_max_micro_batch(self, blocks: int) -> int:
        """The largest finetune micro-batch whose activations fit ``blocks`` KV blocks."""


def knobs(cfg):
    """The ``policy`` node read with typed getters whose errors name the key (``policy.sync_every must be an
    integer, got 'often'``): a ``simcolo.config.read.Group``."""
    # imported here: simcolo.config imports the serving layer, which imports the policies
    from simcolo.config.read import Group

    return Group(cfg, "policy")


class RoutingPolicy(ABC):
    """Chooses the instance a request goes to (for disaggregated serving: once per phase)."""

    name: str = "base"
    #: which layout the backend builds: ``serving`` (no training), ``isolated`` (separate serving and
    #: training GPUs), ``pipelines`` (every node serves and trains), ``finetune`` (prefill/decode
    #: disaggregated, LoRA finetuning on decode GPUs)
    layout: str = "serving"
    #: the ``policy.*`` keys it reads besides ``name`` (any other key in the node is refused)
    config_keys: tuple[str, ...] = ()
    #: co-located pipelines: offer deferred training tasks again at every request arrival too (not only
    #: when a training task completes), for a policy whose deferral depends on the load it observes
    retry_on_arrival: bool = False

    def __init__(self, cfg=None, rng=None):
        self.cfg, self.rng = cfg, rng
        self.predictor: CostPredictor | None = None

    def bind(self, predictor: CostPredictor) -> None:
        """The backend hands the policy its cost predictions before the run starts."""
        self.predictor = predictor

    @abstractmethod
    def route(self, request: Request, instances: Sequence[InstanceView], now: float) -> int:
        """Return the position in ``instances`` of the chosen instance."""

    def on_request_finished(self, request: Request, now: float) -> None:
        """A request left the system (finished, or refused): its measured latencies, for a policy that
        closes a loop on them. Called by both backends when training co-locates with serving."""


class PipelinePolicy(RoutingPolicy):
    """Places inference requests and training tasks on co-located nodes."""

    layout = "pipelines"
    release: str = "async"          # when a node's pipeline admits its next task (async | sync)
    memory_threshold: float | None = None   # a stage starts a forward only under this memory fraction

    @abstractmethod
    def place_training(self, task, nodes: Sequence[NodeView], predictor: CostPredictor, now: float) -> int | None:
        """The node for a training task, or ``None`` to defer it (it is offered again later)."""


class FinetunePolicy(RoutingPolicy):
    """Decides, per decode iteration, the SM split and the finetune micro-batch on a decode GPU."""

    layout = "finetune"
    static_memory: bool = False
    #: how the plan's knob is applied on the GPU: ``partition`` (the decode SM share, or None for plain
    #: streams) or ``time_slice`` (the finetune's fraction of each decode iteration's time)
    sharing: str = "partition"

    @abstractmethod
    def plan_finetune(self, state, predictor: CostPredictor, running_micro_batch: int | None
                      ) -> tuple[float | None, int, float]:
        """Return (knob, micro-batch size, predicted co-run decode iteration latency). The knob is the
        decode SM share (None: no partition) or, with ``sharing = "time_slice"``, the finetune's share of
        time. ``running_micro_batch``: the micro-batch already running (only the knob may change; a size
        of 0 asks to stop it)."""
