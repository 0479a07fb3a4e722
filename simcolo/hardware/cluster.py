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


class Topology:
    """The cluster's shape: nodes of identical GPUs and the links between them (no state)."""

    def __init__(self, gpu: GPUSpec, num_nodes: int, gpus_per_node: int, network_bandwidth_bytes_per_s: float,
                 network_latency_s: float, nvlink_latency_s: float):
        if num_nodes < 1 or gpus_per_node < 1:
            raise ConfigError(f"cluster: num_nodes and gpus_per_node must be >= 1, got "
                              f"{num_nodes} and {gpus_per_node}")
        if network_bandwidth_bytes_per_s <= 0:
            raise ConfigError("cluster.network_bandwidth_gbps must be > 0")
        self.spec = gpu
        self.num_nodes, self.gpus_per_node = num_nodes, gpus_per_node
        self.num_gpus = num_nodes * gpus_per_node
        self.nvlink = Link(gpu.nvlink_bandwidth_bytes_per_s, nvlink_latency_s)
        self.network = Link(network_bandwidth_bytes_per_s, network_latency_s)

    @classmethod
    def from_config(cls, gpu: GPUSpec, c) -> "Topology":
        """From a ``config.groups.ClusterConfig``."""
        return cls(gpu, c.num_nodes, c.gpus_per_node, c.network_bandwidth_bytes_per_s, c.network_latency_s,
                   c.nvlink_latency_s)

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def link(self, a: int, b: int) -> Link:
        return self.nvlink if self.node_of(a) == self.node_of(b) else self.network

    def allocate_groups(self, count: int, size: int, start: int = 0) -> list[list[int]]:
        """``count`` groups of ``size`` consecutive GPUs from ``start``; a group never spans nodes."""
        if size > self.gpus_per_node:
            raise ConfigError(f"serving.tp={size} is larger than cluster.gpus_per_node="
                              f"{self.gpus_per_node}: tensor parallelism must stay inside a node")
        if self.gpus_per_node % size:
            raise ConfigError(f"cluster.gpus_per_node={self.gpus_per_node} is not a multiple of "
                              f"serving.tp={size}")
        end = start + count * size
        if end > self.num_gpus:
            raise ConfigError(f"{count} instance(s) with tp={size} need {count * size} GPUs from "
                              f"GPU {start}, but the cluster has {self.num_gpus}")
        return [list(range(s, s + size)) for s in range(start, end, size)]


class Cluster:
    """A topology's GPUs, each a memory pool and a shared compute on the backend's clock ``env``."""

    def __init__(self, env: SimEnvironment, topology: Topology, interference: InterferenceModel | None = None):
        self.topology = topology
        self.spec = topology.spec
        self.gpus_per_node = topology.gpus_per_node
        self.gpus = [GPU(i, topology.node_of(i), topology.spec, MemoryPool(topology.spec.memory_bytes, f"gpu{i}"),
                         SharedCompute(env, interference, i))
                     for i in range(topology.num_gpus)]
        self.nvlink, self.network = topology.nvlink, topology.network

    def link(self, a: int, b: int) -> Link:
        return self.topology.link(a, b)

    def allocate_groups(self, count: int, size: int, start: int = 0) -> list[list[int]]:
        return self.topology.allocate_groups(count, size, start)

    def apply(self, allocations) -> None:
        """Make a layout plan's allocations (``layout.plan.Allocation``) in the GPUs' memory pools."""
        for a in allocations:
            self.gpus[a.gpu].memory.allocate(a.use, a.nbytes)
