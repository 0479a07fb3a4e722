"""The ``training`` group, read once: full-parameter training or LoRA finetuning (two types, each with the
keys it uses), or ``None`` for ``training.kind: none``; its ``data`` stream and ``learning_curve``.

``conf/training/lora.yaml`` inherits full.yaml's keys and full.yaml carries ``rank``: a key of the group that
the chosen kind does not use is accepted and ignored (it is not a typo); a key of neither is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from simcolo.config.read import Group
from simcolo.errors import ConfigError
from simcolo.training.schedules import SCHEDULES

DATA_KEYS = ("kind", "backlog", "rate_tps", "share", "job_rate_per_s", "job_tasks")
CURVE_KEYS = ("kind", "initial_loss", "final_loss", "steps_scale", "exponent", "path")
FULL_KEYS = ("stages", "micro_batch", "seq_len", "global_batch", "schedule", "max_inflight",
             "state_bytes_per_param", "activation_checkpointing")
LORA_KEYS = ("rank", "micro_batch", "seq_len", "global_batch", "activation_checkpointing", "stages", "schedule",
             "max_inflight")
TRAINING_KEYS = ("kind", "data", "learning_curve", *FULL_KEYS, *LORA_KEYS)
TRAINING_KINDS = ("full", "lora", "none")
#: training.data.kind (what each means: simcolo/training/data.py)
DATA_KINDS = ("backlog", "poisson", "requests", "jobs")


@dataclass(frozen=True)
class TrainingData:
    """Where training tasks come from (``training.data``; simcolo/training/data.py): ``backlog`` tasks
    outstanding at all times, Poisson arrivals at ``rate_tps`` or as ``share`` of all tasks, the served
    ``requests``' tokens, or finetune ``jobs``. Only the kind's own keys are set; the others are None."""

    kind: str                          # backlog | poisson | requests | jobs
    backlog: int | None = None         # backlog: >= 0 (0: no training task ever)
    rate_tps: float | None = None      # poisson: exactly one of rate_tps (> 0) ...
    share: float | None = None         # ... and share, in (0, 1)
    job_rate_per_s: float | None = None   # jobs: > 0
    job_tasks: int | None = None          # jobs: >= 1

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "training.data") -> "TrainingData":
        g = Group(node, key_prefix)
        g.check_known(DATA_KEYS)
        kind = g.raw("kind")
        if kind not in DATA_KINDS:
            raise ConfigError(f"{g.key('kind')} '{kind}' is unknown; expected one of {DATA_KINDS}")
        if kind == "backlog":
            return cls(kind, backlog=g.int("backlog", min=0))
        if kind == "poisson":
            rate, share = g.raw("rate_tps"), g.raw("share")
            if (rate is None) == (share is None):
                raise ConfigError(f"{g.key('kind')}=poisson needs exactly one of rate_tps and share, got "
                                  f"rate_tps={rate!r} and share={share!r}")
            if share is not None:
                return cls(kind, share=g.fraction("share", "(0, 1)"))
            return cls(kind, rate_tps=g.float("rate_tps", gt=0))
        if kind == "jobs":
            return cls(kind, job_rate_per_s=g.float("job_rate_per_s", gt=0), job_tasks=g.int("job_tasks", min=1))
        return cls(kind)

    def as_mapping(self) -> dict[str, Any]:
        """The ``training.data`` mapping the stream classes read (``TrainingStream``, the replay's
        ``TaskStream``), for code that takes a mapping."""
        return {"kind": self.kind, "backlog": self.backlog, "rate_tps": self.rate_tps, "share": self.share,
                "job_rate_per_s": self.job_rate_per_s, "job_tasks": self.job_tasks}


@dataclass(frozen=True)
class LearningCurveConfig:
    """The inference loss of a model version (``training.learning_curve``): ``power`` (``final + (initial -
    final) / (1 + steps / steps_scale) ** exponent``) or ``table`` (a calibration directory's
    ``learning_curve.csv`` at ``path``, read by ``LearningCurve.from_config``)."""

    kind: str                              # power | table
    initial_loss: float | None = None      # power: initial_loss >= final_loss >= 0
    final_loss: float | None = None
    steps_scale: float | None = None       # power: > 0
    exponent: float | None = None          # power: > 0
    path: str | None = None                # table: the calibration directory, as given

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any],
                 key_prefix: str = "training.learning_curve") -> "LearningCurveConfig":
        g = Group(node, key_prefix)
        g.check_known(CURVE_KEYS)
        kind = g.raw("kind")
        if kind == "power":
            initial, final = g.float("initial_loss"), g.float("final_loss")
            scale, exponent = g.float("steps_scale"), g.float("exponent")
            if not (initial >= final >= 0 and scale > 0 and exponent > 0):
                raise ConfigError(f"{key_prefix}: expected initial_loss >= final_loss >= 0, steps_scale > 0 and "
                                  f"exponent > 0; got {initial}, {final}, {scale}, {exponent}")
            return cls(kind, initial_loss=initial, final_loss=final, steps_scale=scale, exponent=exponent)
        if kind == "table":
            if g.raw("path", None) is None:
                raise ConfigError(f"{g.key('path')} must name a calibration directory with kind=table "
                                  f"(+{g.key('path')}=DIR)")
            return cls(kind, path=g.str("path"))
        raise ConfigError(f"{g.key('kind')} '{kind}' is unknown; expected power or table")


def _schedule(g: Group) -> str:
    schedule = g.raw("schedule")
    if schedule not in SCHEDULES:
        raise ConfigError(f"{g.key('schedule')} '{schedule}' is unknown; expected one of {sorted(SCHEDULES)}")
    return schedule


@dataclass(frozen=True)
class FullTraining:
    """Full-parameter training of the served model, pipeline-parallel (``training: full``; policies isolated,
    mix_rr, mix_luf, mix_random, lemix). A task is ``micro_batch`` sequences of ``seq_len`` tokens."""

    kind: ClassVar[str] = "full"
    stages: int                       # pipeline stages (GPUs) per replica
    micro_batch: int                  # sequences per task
    seq_len: int                      # tokens per sequence
    global_batch: int                 # tasks (micro-batches) per optimizer step, per replica
    schedule: str                     # isolated's synchronous schedule: gpipe | 1f1b
    max_inflight: int                 # co-located: tasks in a node's pipeline at once
    state_bytes_per_param: float      # training state per parameter, bf16 weights included
    activation_checkpointing: bool
    data: TrainingData
    learning_curve: LearningCurveConfig

    @property
    def tokens_per_task(self) -> int:
        return self.micro_batch * self.seq_len

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "training") -> "FullTraining":
        g = Group(node, key_prefix)
        g.check_known(TRAINING_KEYS)
        schedule = _schedule(g)
        return cls(stages=g.int("stages", min=1), micro_batch=g.int("micro_batch", min=1),
                   seq_len=g.int("seq_len", min=1), global_batch=g.int("global_batch", min=1), schedule=schedule,
                   max_inflight=g.int("max_inflight", min=1),
                   state_bytes_per_param=g.float("state_bytes_per_param", gt=0),
                   activation_checkpointing=g.bool("activation_checkpointing"),
                   data=TrainingData.from_cfg(g.raw("data"), g.key("data")),
                   learning_curve=LearningCurveConfig.from_cfg(g.raw("learning_curve"), g.key("learning_curve")))


@dataclass(frozen=True)
class LoraFinetune:
    """LoRA finetuning (``training: lora``): the whole model with rank-``rank`` adapters, frozen base weights;
    a task is ``micro_batch`` sequences of ``seq_len`` tokens. On the decode GPUs of a finetune layout
    (harli, static_share, flexllm) the whole model trains on one GPU; on the pipeline layouts (isolated,
    mix_rr, mix_luf, mix_random, lemix) the same job runs as a pipeline of ``stages`` GPUs with
    ``schedule`` and ``max_inflight`` as for full training, so every co-location policy can run it.
    Activation checkpointing is not modelled for LoRA (``activation_checkpointing=true`` is refused)."""

    kind: ClassVar[str] = "lora"
    rank: int
    micro_batch: int                  # sequences per task (a slice of a job)
    seq_len: int
    global_batch: int                 # micro-batches per adapter optimizer step
    data: TrainingData
    learning_curve: LearningCurveConfig
    stages: int = 1                   # pipeline layouts: stages (GPUs) per replica
    schedule: str = "1f1b"            # isolated's synchronous schedule
    max_inflight: int = 1             # co-located pipelines: tasks in a node's pipeline at once

    @property
    def activation_checkpointing(self) -> bool:
        """Always False (refused when read), for code that asks either training type."""
        return False

    @property
    def tokens_per_task(self) -> int:
        return self.micro_batch * self.seq_len

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "training") -> "LoraFinetune":
        g = Group(node, key_prefix)
        g.check_known(TRAINING_KEYS)
        if "activation_checkpointing" in g.node and g.bool("activation_checkpointing"):
            raise ConfigError(f"{g.key('activation_checkpointing')}=true is not modelled for LoRA finetuning "
                              "(policies harli, static_share, flexllm); set it to false")
        pipeline = {}
        if "stages" in g.node:
            pipeline["stages"] = g.int("stages", min=1)
        if "schedule" in g.node:
            pipeline["schedule"] = _schedule(g)
        if "max_inflight" in g.node:
            pipeline["max_inflight"] = g.int("max_inflight", min=1)
        return cls(rank=g.int("rank", min=1), micro_batch=g.int("micro_batch", min=1),
                   seq_len=g.int("seq_len", min=1), global_batch=g.int("global_batch", min=1),
                   data=TrainingData.from_cfg(g.raw("data"), g.key("data")),
                   learning_curve=LearningCurveConfig.from_cfg(g.raw("learning_curve"), g.key("learning_curve")),
                   **pipeline)


Training = FullTraining | LoraFinetune


def training_from_cfg(node: Mapping[str, Any], key_prefix: str = "training") -> Training | None:
    """``training.kind``: ``full`` -> :class:`FullTraining`, ``lora`` -> :class:`LoraFinetune`, ``none`` ->
    None (the group's other keys are then not read, only checked for typos)."""
    g = Group(node, key_prefix)
    kind = g.raw("kind")
    if kind not in TRAINING_KINDS:
        raise ConfigError(f"{g.key('kind')} '{kind}' is unknown; expected one of {list(TRAINING_KINDS)}")
    if kind == "full":
        return FullTraining.from_cfg(node, key_prefix)
    if kind == "lora":
        return LoraFinetune.from_cfg(node, key_prefix)
    g.check_known(TRAINING_KEYS)
    return None
