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


class _Resident:
    """A serving instance as the shared compute sees it: it only takes the rate it is given."""

    def __init__(self):
        self.rates = []

    def set_rate(self, gpu, rate):
        self.rates.append(rate)


def test_a_kernel_slowed_and_sped_up_ends_where_processor_sharing_says_with_few_timer_events():
    # a 1 s training kernel beside a resident that runs for 0.1 s out of every 0.2 s: at half speed
    # while it runs (UniformSlowdown(1)), so the kernel does 0.15 s of work per 0.2 s period
    env = SimEnvironment()
    compute = SharedCompute(env, UniformSlowdown(1.0))
    resident = _Resident()
    ended = []
    compute.start("train_forward", 1.0, lambda: ended.append(env.now))
    for k in range(8):
        At(env, 0.2 * k).callbacks.append(lambda _ev: compute.set_resident(resident, "decode"))
        At(env, 0.2 * k + 0.1).callbacks.append(lambda _ev: compute.set_resident(resident, None))
    before = next(env._eid)   # SimPy's event counter
    env.run()
    # 6 periods do 0.9 s of work by 1.2 s; 0.05 s more at half speed beside the 7th resident spell
    # (1.2 .. 1.3 s), the last 0.05 s alone: the kernel ends at 1.35 s
    assert ended == [pytest.approx(1.35)]
    # busy: the kernel until 1.35 s, then the 8th resident spell (1.4 .. 1.5 s)
    assert compute.running == [] and compute.busy_s == pytest.approx(1.45)
    assert resident.rates == [0.5] * 7 + [1.0]   # half speed beside the kernel, full after it
    # slowing down keeps the timer (re-armed when it fires early); a speed-up arms one only if the end
    # moves before the armed time: here fewer timers than the 7 speed-ups (one per rate change: 14)
    timers = next(env._eid) - before - 1
    assert 1 <= timers < 7
