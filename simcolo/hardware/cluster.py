"""A cluster: nodes of identical GPUs, NVLink inside a node, a network between nodes."""
from __future__ import annotations

from dataclasses import dataclass

from simcolo.errors import ConfigError
from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import SimEnvironment
from simcolo.hardware.interference import InterferenceModel
from simcolo.hardware.memory import MemoryPool
from simcolo.specs import GPUSpec


@dataclass
class GPU:
    index: int
    node: int
    spec: GPUSpec
    memory: MemoryPool
    compute: SharedCompute


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float
    latency_s: float

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


class Cluster:
    def __init__(self, env: SimEnvironment, gpu: GPUSpec, num_nodes: int, gpus_per_node: int,
                 network_bandwidth_bytes_per_s: float, network_latency_s: float,
                 nvlink_latency_s: float, interference: InterferenceModel | None = None):
        if num_nodes < 1 or gpus_per_node < 1:
            raise ConfigError(f"cluster: num_nodes and gpus_per_node must be >= 1, got "
                              f"{num_nodes} and {gpus_per_node}")
        if network_bandwidth_bytes_per_s <= 0:
            raise ConfigError("cluster.network_bandwidth_gbps must be > 0")
        self.spec = gpu
        self.gpus_per_node = gpus_per_node
        self.gpus = [GPU(i, i // gpus_per_node, gpu, MemoryPool(gpu.memory_bytes, f"gpu{i}"),
                         SharedCompute(env, interference, i))
                     for i in range(num_nodes * gpus_per_node)]
        self.nvlink = Link(gpu.nvlink_bandwidth_bytes_per_s, nvlink_latency_s)
        self.network = Link(network_bandwidth_bytes_per_s, network_latency_s)

    def link(self, a: int, b: int) -> Link:
        return self.nvlink if self.gpus[a].node == self.gpus[b].node else self.network

    def allocate_groups(self, count: int, size: int, start: int = 0) -> list[list[int]]:
        """``count`` groups of ``size`` consecutive GPUs from ``start``; a group never spans nodes."""
        if size > self.gpus_per_node:
            raise ConfigError(f"serving.tp={size} is larger than cluster.gpus_per_node="
                              f"{self.gpus_per_node}: tensor parallelism must stay inside a node")
        if self.gpus_per_node % size:
            raise ConfigError(f"cluster.gpus_per_node={self.gpus_per_node} is not a multiple of "
                              f"serving.tp={size}")
        end = start + count * size
        if end > len(self.gpus):
            raise ConfigError(f"{count} instance(s) with tp={size} need {count * size} GPUs from "
                              f"GPU {start}, but the cluster has {len(self.gpus)}")
        return [list(range(s, s + size)) for s in range(start, end, size)]
