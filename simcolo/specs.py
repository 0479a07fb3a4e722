"""Model and GPU specifications, read from the Hydra config groups ``conf/model`` and ``conf/gpu``.

The same specs feed the roofline cost generator, the memory model and (later) calibrate/, so there
is one place that says how big a model is.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import yaml

from simcolo.errors import ConfigError
from simcolo.paths import CONF_DIR


def _from_mapping(cls, data: Mapping[str, Any], where: str):
    names = {f.name for f in fields(cls)}
    missing = sorted(names - set(data))
    extra = sorted(set(data) - names)
    if missing or extra:
        raise ConfigError(f"{where}: expected keys {sorted(names)}; missing {missing}, unknown {extra}")
    kwargs = {}
    for f in fields(cls):
        value = data[f.name]
        try:
            kwargs[f.name] = _convert(f.type, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: key '{f.name}' = {value!r} is not a valid {f.type}") from exc
    return cls(**kwargs)


def _convert(type_name: str, value: Any):
    if type_name == "int":
        if isinstance(value, bool) or int(value) != float(value):
            raise ValueError("not an integer")
        return int(value)
    if type_name == "float":
        return float(value)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ValueError("not a boolean")
        return value
    return str(value)


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-family decoder (Llama-2/3, Qwen2.5 share this shape)."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_context_len: int
    tie_embeddings: bool
    qkv_bias: bool
    dtype_bytes: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention + SwiGLU MLP + two RMSNorms)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        if self.qkv_bias:
            attn += h + 2 * kv
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        return (self.num_layers * self.layer_params + self.embedding_params
                + self.lm_head_params + self.hidden_size)

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def validate(self, where: str) -> None:
        for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                    "intermediate_size", "vocab_size", "max_context_len", "dtype_bytes"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: key '{key}' must be > 0, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(f"{where}: num_attention_heads {self.num_attention_heads} is not "
                              f"divisible by num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16_flops: float
    hbm_bandwidth_bytes_per_s: float
    memory_bytes: float
    nvlink_bandwidth_bytes_per_s: float

    def validate(self, where: str) -> None:
        for f in fields(self):
            if f.type == "float" and getattr(self, f.name) <= 0:
                raise ConfigError(f"{where}: key '{f.name}' must be > 0, got {getattr(self, f.name)}")




def model_spec_from_mapping(data: Mapping[str, Any], where: str = "model") -> ModelSpec:
    spec = _from_mapping(ModelSpec, dict(data), where)
    spec.validate(where)
    return spec


def gpu_spec_from_mapping(data: Mapping[str, Any], where: str = "gpu") -> GPUSpec:
    spec = _from_mapping(GPUSpec, dict(data), where)
    spec.validate(where)
    return spec


def _load_yaml(group: str, name: str) -> dict:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} '{name}': no {path}; known: {', '.join(known)}")
    with path.open() as fh:
        return yaml.safe_load(fh)


def load_model_spec(name: str) -> ModelSpec:
    """Read ``conf/model/<name>.yaml`` (the same file Hydra composes)."""
    return model_spec_from_mapping(_load_yaml("model", name), f"conf/model/{name}.yaml")


def load_gpu_spec(name: str) -> GPUSpec:
    """Read ``conf/gpu/<name>.yaml``."""
    return gpu_spec_from_mapping(_load_yaml("gpu", name), f"conf/gpu/{name}.yaml")


def known_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def known_gpus() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "gpu").glob("*.yaml"))
