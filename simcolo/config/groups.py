"""The small config groups, each read once: ``cluster``, ``slo``, ``costs``, ``metrics``, ``sim`` and the live
replay's ``device`` + ``replay`` keys (conf/replay.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from simcolo.config.read import Group
from simcolo.errors import ConfigError


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster's shape and network (``conf/cluster``); the GPU type is the ``gpu`` group."""

    num_nodes: int
    gpus_per_node: int
    network_bandwidth_bytes_per_s: float   # between nodes, per GPU
    network_latency_s: float
    nvlink_latency_s: float

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "cluster") -> "ClusterConfig":
        g = Group(node, key_prefix)
        g.check_known(("num_nodes", "gpus_per_node", "network_bandwidth_bytes_per_s", "network_latency_s",
                       "nvlink_latency_s"))
        return cls(num_nodes=g.int("num_nodes", min=1), gpus_per_node=g.int("gpus_per_node", min=1),
                   network_bandwidth_bytes_per_s=g.float("network_bandwidth_bytes_per_s", gt=0),
                   network_latency_s=g.float("network_latency_s", ge=0),
                   nvlink_latency_s=g.float("nvlink_latency_s", ge=0))


@dataclass(frozen=True)
class SloConfig:
    """Latency SLOs (``conf/slo``): a request attains the SLO if it meets both."""

    ttft_s: float
    tpot_s: float

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "slo") -> "SloConfig":
        g = Group(node, key_prefix)
        g.check_known(("ttft_s", "tpot_s"))
        return cls(ttft_s=g.float("ttft_s", gt=0), tpot_s=g.float("tpot_s", gt=0))


INTERFERENCE_MODES = ("table", "none")
#: Named points of the interference dial (``costs.interference_scale``): each co-run slowdown ``s`` of the
#: table becomes ``1 + scale * (s - 1)``. ``optimistic`` halves the extra time (kernel-slicing schedulers
#: such as Tally's keep inference within 7.2 % where naive sharing costs 188.9 % at P99, Tally, ASPLOS'25);
#: ``pessimistic`` doubles it (the roofline's streams default, ~1.8x for decode beside training, becomes
#: ~2.6x: the tail that naive sharing reaches in Tally's measurements).
INTERFERENCE_SCALES = {"optimistic": 0.5, "default": 1.0, "pessimistic": 2.0}


@dataclass(frozen=True)
class CostsConfig:
    """Where the cost tables come from (``conf/costs``): ``path`` (a table directory) or ``tables_root``
    (a collection of ``<gpu>__<model>__tp<N>`` directories), as given (resolve them with
    ``simcolo.paths.resolve_path``); ``interference``: ``table`` (co-run slowdowns from the tables) or
    ``none``; ``interference_scale``: the interference dial, a number >= 0 (given as one or as a name of
    :data:`INTERFERENCE_SCALES`); ``interference_scale_name``: the name it was given by (``default`` for 1,
    else the number as written) -- the comparison report groups runs by it."""

    path: str | None
    tables_root: str | None
    interference: str
    interference_scale: float = 1.0
    interference_scale_name: str = "default"

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "costs") -> "CostsConfig":
        g = Group(node, key_prefix)
        g.check_known(("path", "tables_root", "interference", "interference_scale"))
        mode = g.raw("interference", "table")
        if mode not in INTERFERENCE_MODES:
            raise ConfigError(f"{g.key('interference')} '{mode}' is unknown; expected table or none")
        raw = g.raw("interference_scale", "default")
        if isinstance(raw, str) and raw in INTERFERENCE_SCALES:
            scale, name = INTERFERENCE_SCALES[raw], raw
        elif isinstance(raw, str) and not _is_number(raw):
            raise ConfigError(f"{g.key('interference_scale')} '{raw}' is unknown; expected a number >= 0 or one of: "
                              f"{', '.join(INTERFERENCE_SCALES)}")
        else:
            scale = g.float("interference_scale", ge=0)
            name = next((k for k, v in INTERFERENCE_SCALES.items() if v == scale), f"{scale:g}")
        return cls(path=g.str("path", optional=True), tables_root=g.str("tables_root", optional=True),
                   interference=mode, interference_scale=scale, interference_scale_name=name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class MetricsConfig:
    """What a run records and prints (``metrics`` in conf/config.yaml)."""

    timeline_interval_s: float   # GPU memory / queue / busy-time sampling interval, simulated seconds
    plots: bool
    quiet: bool                  # true: the CLI does not print the summary table

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "metrics") -> "MetricsConfig":
        g = Group(node, key_prefix)
        g.check_known(("timeline_interval_s", "plots", "quiet"))
        return cls(timeline_interval_s=g.float("timeline_interval_s", gt=0), plots=g.bool("plots"),
                   quiet=g.bool("quiet"))


@dataclass(frozen=True)
class SimConfig:
    """The simulated clock (``sim`` in conf/config.yaml): ``max_time_s`` stops it (None: run until every
    request is done); ``training_spans`` advances training in closed form where it repeats: isolated
    training's identical steps many per event, a finetuner's micro-batches on an idle decode instance
    as one chain, and a co-located pipeline's repeating cycles while no node serves anything (false: one
    event per step, micro-batch or kernel, the same results; a finetuner's and a pipeline's to float
    rounding)."""

    max_time_s: float | None
    training_spans: bool = True

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "sim") -> "SimConfig":
        g = Group(node, key_prefix)
        g.check_known(("max_time_s", "training_spans"))
        return cls(max_time_s=g.float("max_time_s", gt=0, optional=True),
                   training_spans=g.bool("training_spans") if "training_spans" in node else True)


DEVICES = ("cpu", "cuda")
ISOLATED_TRAINERS = ("auto", "process", "thread")


@dataclass(frozen=True)
class ReplayConfig:
    """The live replay's own settings (conf/replay.yaml): the top-level ``device`` and the ``replay`` keys.
    Whether torch sees a CUDA device is checked when the replay starts, not here."""

    device: str                          # cpu | cuda
    cpu_threads: int                     # torch intra-op threads on the CPU
    warmup_iterations: int               # untimed calls per runner before the clock starts
    isolated_trainer: str                # auto | process | thread
    gil_switch_interval_s: float | None  # None: Python's default

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "") -> "ReplayConfig":
        """``node``: the config's root (it holds ``device`` and ``replay``); ``key_prefix``: the root's
        name (``""`` for the composed config)."""
        root = Group(node, key_prefix)
        device = root.raw("device")
        if device not in DEVICES:
            raise ConfigError(f"{root.key('device')}={device!r}; expected cpu or cuda")
        g = root.sub("replay")
        g.check_known(("cpu_threads", "warmup_iterations", "isolated_trainer", "gil_switch_interval_s"))
        mode = g.raw("isolated_trainer")
        if mode not in ISOLATED_TRAINERS:
            raise ConfigError(f"{g.key('isolated_trainer')}={mode!r}; expected auto, process or thread")
        if mode == "process" and device == "cuda":
            raise ConfigError(f"{g.key('isolated_trainer')}=process runs on the CPU only; use thread or auto "
                              f"with cuda")
        return cls(device=device, cpu_threads=g.int("cpu_threads", min=1),
                   warmup_iterations=g.int("warmup_iterations", min=0), isolated_trainer=mode,
                   gil_switch_interval_s=g.float("gil_switch_interval_s", gt=0, optional=True))
