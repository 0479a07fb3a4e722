import json
import warnings

import pandas as pd
import pytest

from simcolo.configs import load_config
from simcolo.costs import OffGridWarning
from simcolo.simulate import simulate


def run_sim(*overrides: str, out_dir=None, plots: bool = False):
    """Run the real simulator on the project's real Hydra config with ``overrides``."""
    cfg = load_config([f"metrics.plots={str(plots).lower()}", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffGridWarning)
        return simulate(cfg, out_dir)


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


def edit_meta(directory, change):
    """Apply ``change`` to the directory's metadata.json in place."""
    path = directory / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
