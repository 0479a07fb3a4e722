import json
import warnings

import pandas as pd
import pytest

from simcolo.config.compose import load_config
from simcolo.costs import OffGridWarning
from simcolo.simulate import simulate


def run_sim(*overrides: str, out_dir=None, plots: bool = False):
    """Run the real simulator on the project's real Hydra config with ``overrides``."""
    cfg = load_config([f"metrics.plots={str(plots).lower()}", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffGridWarning)
        return simulate(cfg, out_dir)


def pytest_collection_modifyitems(config, items):
    """The tests that read the session's CPU calibration run first, in their order. pytest-xdist hands
    each worker a first batch of consecutive tests (a quarter of its share, ~110 here), so they all go to
    one worker, and the calibration (~100 s) is made once, not once per worker. (``--dist loadgroup``
    would say it outright, but it does not group on pytest 9.2: pytest-dev/pytest-xdist#1386.)"""
    items[:] = sorted(items, key=lambda item: "cpu_calibration" not in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _single_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a project dependency
        return
    torch.set_num_threads(1)


def edit_csv(directory, name, change):
    """Rewrite ``<directory>/<name>.csv`` as ``change(DataFrame)``; returns its path (bad-table tests)."""
    path = directory / f"{name}.csv"
    change(pd.read_csv(path)).to_csv(path, index=False)
    return path


def set_cell(directory, name, row: int, column: str, value):
    """Write ``value`` into one cell of ``<directory>/<name>.csv`` (the column is made an object column
    first, so a value of another type, such as a string in a number column, is written as is)."""
    def change(df):
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        return df
    return edit_csv(directory, name, change)


def edit_meta(directory, change):
    """Apply ``change`` to the directory's metadata.json in place."""
    path = directory / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def cpu_calibration(tmp_path_factory):
    """``python -m calibrate model=tiny device=cpu out=DIR`` with the default CPU grids, once per session,
    on one worker (``pytest_collection_modifyitems``): the calibrate/ tests read its tables, the replay
    tests replay against them. Its engine run is cut to 5 s of arrivals (15 by default) and made once, steady
    or not (up to 3 runs by default): the tests check that it runs and what it writes, not its precision."""
    import subprocess
    import sys
    import time

    from simcolo.paths import PROJECT_ROOT

    out = tmp_path_factory.mktemp("calib") / "cpu__tiny__tp1"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "calibrate", "model=tiny", "device=cpu", f"out={out}",
                           "engine_run.duration_s=5", "engine_run.tries=1"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, wall, proc


def run_replay(*overrides: str, out_dir=None, plots: bool = False):
    """Run the real live replay (``python -m simcolo.replay``'s config) with ``overrides``."""
    from simcolo.replay.run import replay

    cfg = load_config([f"metrics.plots={str(plots).lower()}", *overrides], config_name="replay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffGridWarning)
        return replay(cfg, out_dir)
