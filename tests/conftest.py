import warnings

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
