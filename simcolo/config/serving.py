"""The ``serving`` group, read once into the serving layout and the batching rules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from simcolo.config.read import Group
from simcolo.errors import ConfigError
from simcolo.serving.batch_scheduler import BatchingConfig
from simcolo.serving.system import MODES, ServingLayout

KEYS = ("mode", "tp", "num_instances", "prefill_instances", "decode_instances", "max_num_seqs",
        "max_batched_tokens", "block_size", "chunked_prefill", "watermark", "gpu_memory_utilization",
        "num_gpu_blocks_override", "fast_advance")


@dataclass(frozen=True)
class ServingConfig:
    """How serving is laid out (``layout``: mode, tp, instance counts, memory) and how an instance batches
    (``batching``) -- ``conf/serving``. Checked here: each value on its own and the instance counts of
    ``mode=disaggregated``; what needs the model or the cluster (memory fit, GPU counts) is checked where
    they meet (``RunConfig`` checks the token budget against the model's context)."""

    layout: ServingLayout
    batching: BatchingConfig

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any], key_prefix: str = "serving") -> "ServingConfig":
        g = Group(node, key_prefix)
        g.check_known(KEYS)
        mode = g.raw("mode")
        if mode not in MODES:
            raise ConfigError(f"{g.key('mode')} '{mode}' is unknown; expected one of {MODES}")
        tp = g.int("tp", min=1)
        prefill, decode = g.int("prefill_instances", min=0), g.int("decode_instances", min=0)
        if mode == "disaggregated" and (prefill < 1 or decode < 1):
            raise ConfigError(f"{g.key('prefill_instances')} and {g.key('decode_instances')} must be >= 1 "
                              f"with {g.key('mode')}=disaggregated, got {prefill} and {decode}")
        layout = ServingLayout(
            mode=mode, tp=tp, num_instances=g.int("num_instances", min=1, optional=True),
            prefill_instances=prefill, decode_instances=decode,
            gpu_memory_utilization=g.fraction("gpu_memory_utilization", "(0, 1]"),
            num_gpu_blocks_override=g.int("num_gpu_blocks_override", min=1, optional=True))
        batching = BatchingConfig(
            max_num_seqs=g.int("max_num_seqs", min=1), max_batched_tokens=g.int("max_batched_tokens", min=1),
            block_size=g.int("block_size", min=1), chunked_prefill=g.bool("chunked_prefill"),
            watermark=g.fraction("watermark", "[0, 1)"), fast_advance=g.bool("fast_advance"))
        return cls(layout, batching)

    def check_context(self, max_context_len: int) -> None:
        """Without chunked prefill, one iteration's token budget must hold the longest prompt
        (``BatchingConfig.validate``'s rule and message)."""
        self.batching.validate(max_context_len)
