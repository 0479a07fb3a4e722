"""The whole run's config, read once at the edge: ``RunConfig.from_cfg(cfg)`` turns the composed Hydra config
(``simcolo.config.compose.load_config``, or the CLI's) into frozen, typed, validated parts.

What is checked here: every group's own values (types, ranges, choices, unknown keys), the token budget
against the model's context. What needs the layout a policy builds (GPU counts, memory fit) is checked when it is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from simcolo.config.groups import ClusterConfig, CostsConfig, MetricsConfig, ReplayConfig, SimConfig, SloConfig
from simcolo.config.read import Group, mapping, read_seed
from simcolo.config.serving import ServingConfig
from simcolo.config.training import Training, training_from_cfg
from simcolo.config.workload import WorkloadConfig
from simcolo.errors import ConfigError
from simcolo.specs import GPUSpec, ModelSpec, gpu_spec_from_mapping, model_spec_from_mapping

GROUPS = ("seed", "model", "gpu", "cluster", "serving", "slo", "costs", "training", "metrics", "sim", "policy",
          "workload")
REPLAY_KEYS = ("device", "replay")


@dataclass(frozen=True)
class RunConfig:
    """One simulation's (or live replay's) config. ``policy`` stays the composed node, its keys checked
    against those its policy reads: ``simcolo.policies.make_policy`` builds the policy from it (each policy
    reads its own knobs); ``training`` is None for ``training.kind: none``; ``replay`` is set for
    conf/replay.yaml."""

    seed: int
    model: ModelSpec
    gpu: GPUSpec
    cluster: ClusterConfig
    serving: ServingConfig
    slo: SloConfig
    costs: CostsConfig
    training: Training | None
    metrics: MetricsConfig
    sim: SimConfig
    policy_name: str
    policy: Mapping[str, Any]
    workload: WorkloadConfig
    replay: ReplayConfig | None = None
    #: GPUs per training replica / co-located node (``training.stages``), read whatever the training kind:
    #: a co-location policy with ``training=none`` serves alone on the layout it would train on
    node_stages: int = 1

    @property
    def training_kind(self) -> str:
        """``full``, ``lora`` or ``none``."""
        return "none" if self.training is None else self.training.kind

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> "RunConfig":
        cfg = mapping(cfg, "")
        is_replay = "replay" in cfg
        root = Group(cfg, "")
        root.check_known(GROUPS + REPLAY_KEYS if is_replay else GROUPS, ignore=("hydra",))
        seed = read_seed(cfg)
        model = model_spec_from_mapping(mapping(root.raw("model"), "model"), "model")
        gpu = gpu_spec_from_mapping(mapping(root.raw("gpu"), "gpu"), "gpu")
        cluster = ClusterConfig.from_cfg(root.raw("cluster"), "cluster")
        serving = ServingConfig.from_cfg(root.raw("serving"), "serving")
        serving.check_context(model.max_context_len)
        slo = SloConfig.from_cfg(root.raw("slo"), "slo")
        costs = CostsConfig.from_cfg(root.raw("costs"), "costs")
        training = training_from_cfg(root.raw("training"), "training")
        metrics = MetricsConfig.from_cfg(root.raw("metrics"), "metrics")
        sim = SimConfig.from_cfg(root.raw("sim"), "sim")
        policy = mapping(root.raw("policy"), "policy")
        policy_name = _policy_name(policy)
        workload = WorkloadConfig.from_cfg(root.raw("workload"), "workload")
        replay = ReplayConfig.from_cfg(cfg, "") if is_replay else None
        node_stages = Group(mapping(root.raw("training"), "training"), "training").int("stages", min=1)
        return cls(seed=seed, model=model, gpu=gpu, cluster=cluster, serving=serving, slo=slo, costs=costs,
                   training=training, metrics=metrics, sim=sim, policy_name=policy_name, policy=policy,
                   workload=workload, replay=replay, node_stages=node_stages)

def _policy_name(policy: Mapping[str, Any]) -> str:
    from simcolo.policies import POLICIES   # the registry make_policy builds from

    g = Group(policy, "policy")
    name = g.raw("name")
    if name not in POLICIES:
        raise ConfigError(f"policy.name '{name}' is unknown; expected one of {sorted(POLICIES)}")
    g.check_known(("name", *POLICIES[name].config_keys), where=f" ({name})")
    return name
