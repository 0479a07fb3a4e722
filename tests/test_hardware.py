"""GPU memory pool, processor-sharing compute and cluster links, on the real SimPy environment."""
import pytest

from simcolo.errors import ConfigError
from simcolo.hardware.cluster import Cluster, Topology
from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.hardware.interference import NoInterference, UniformSlowdown
from simcolo.hardware.memory import MemoryPool, OutOfMemory
from simcolo.specs import load_gpu_spec


def test_memory_pool_never_goes_over_capacity():
    pool = MemoryPool(100.0, "gpu3")
    pool.allocate("weights", 60)
    pool.allocate("kv_cache", 40)
    with pytest.raises(OutOfMemory, match=r"gpu3: cannot allocate .* for 'adapter'"):
        pool.allocate("adapter", 1)
    assert pool.used == 100 and pool.peak == 100
    pool.release("kv_cache", 40)
    assert pool.fits(40) and not pool.fits(41)
    with pytest.raises(ValueError, match="only 60"):
        pool.release("weights", 61)


def _finish_times(interference, jobs):
    """Start each (start_s, work_s) kernel on one GPU; return when each finished."""
    env = SimEnvironment()
    compute = SharedCompute(env, interference)
    done = {}

    def start(name, work):
        compute.run(name, work).callbacks.append(lambda ev: done.__setitem__(name, env.now))

    for name, (at, work) in jobs.items():
        At(env, at).callbacks.append(lambda _ev, n=name, w=work: start(n, w))
    env.run()
    return done, compute


def test_processor_sharing_recomputes_finish_times_when_the_set_changes():
    jobs = {"train": (0.0, 1.0), "decode": (0.25, 0.5)}
    done, _ = _finish_times(NoInterference(), jobs)
    assert done == pytest.approx({"train": 1.0, "decode": 0.75})
    # each at half speed while both run: train has 0.75 left at 0.25 s; decode's 0.5 s of work takes
    # 1.0 s (done at 1.25), by which time train has 0.25 left, finished alone at 1.5 s
    done, compute = _finish_times(UniformSlowdown(1.0), jobs)
    assert done == pytest.approx({"train": 1.5, "decode": 1.25})
    assert compute.busy_s == pytest.approx(1.5)


def test_cluster_links_and_instance_groups():
    env = SimEnvironment()
    cluster = Cluster(env, Topology(load_gpu_spec("h100-sxm"), num_nodes=2, gpus_per_node=4,
                                    network_bandwidth_bytes_per_s=50e9, network_latency_s=5e-6,
                                    nvlink_latency_s=2e-6))
    assert cluster.link(0, 3) is cluster.nvlink and cluster.link(3, 4) is cluster.network
    assert cluster.network.transfer_s(50e9) == pytest.approx(1 + 5e-6)
    assert cluster.allocate_groups(4, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="tensor parallelism must stay inside a node"):
        cluster.allocate_groups(1, 8)
    with pytest.raises(ConfigError, match="need 10 GPUs"):
        cluster.allocate_groups(5, 2)
