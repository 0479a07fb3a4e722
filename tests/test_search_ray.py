"""The co-location search on a Ray cluster through hydra-ray-launcher (`hydra/launcher=search_ray`): a
local Ray head started by the test on the loopback address, the sweep process connecting to it as to
any existing cluster, the simulations running in Ray's worker processes."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from simcolo.paths import PROJECT_ROOT

pytest.importorskip("ray", reason="ray is not installed (pip install hydra-ray-launcher==1.2.2 'joblib<1.6')")
pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed "
                    "(pip install hydra-ray-launcher==1.2.2 'joblib<1.6')")

#: a loopback-only, single-machine cluster without Ray 2.x's token authentication (its clients would need
#: the head's token): RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use 127.0.0.1 as the node address
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` in its own process group; stopped (that process, which stops the Ray
    processes it started) at the end."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")          # short: Ray's socket paths must stay short
    env = {**os.environ, **RAY_ENV}
    log = Path(temp) / "head.log"
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
           "--disable-usage-stats", "--object-store-memory=100000000", f"--temp-dir={temp}", "--block"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    started = False
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log.read_text():
            started = True
            break
        time.sleep(0.5)
    if not started:
        tail = log.read_text()[-2000:]
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"a local Ray head could not start on this machine: {tail}")
    yield f"127.0.0.1:{port}", env
    _stop(proc)
    shutil.rmtree(temp, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)      # the process group this fixture started, nothing else
            proc.wait(30)


SEARCH = ["-m", "+search=colocation", "workload.max_requests=300", "hydra.sweeper.n_trials=4",
          "hydra.sweeper.sampler.population_size=2"]


@pytest.mark.slow
def test_colocation_search_on_a_ray_cluster_equals_the_local_one(ray_head, tmp_path):
    address, env = ray_head
    ray_dir, local_dir = tmp_path / "ray", tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "simcolo", *SEARCH, "hydra/launcher=search_ray",
                           f"hydra.launcher.ray.init.address={address}", f"hydra.sweep.dir={ray_dir}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "Ray Launcher is launching 2 jobs" in logs and f"Connecting to existing Ray cluster at address: {address}" \
        in logs
    assert sorted(p.name for p in ray_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    assert all((ray_dir / str(j) / "summary.json").is_file() for j in range(4))
    assert "search: " in proc.stdout and (ray_dir / "pareto.png").is_file()

    local = subprocess.run([sys.executable, "-m", "simcolo", *SEARCH, f"hydra.sweep.dir={local_dir}"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert local.returncode == 0, local.stderr[-3000:]
    # the same trials and results whichever engine ran them
    assert (ray_dir / "pareto.csv").read_bytes() == (local_dir / "pareto.csv").read_bytes()
