"""Compose the project's Hydra config outside the CLI (tests, benchmarks, notebooks)."""
from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from simcolo.paths import CONF_DIR


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """The config ``simcolo <overrides>`` would run (``config_name="calibrate"``: ``python -m calibrate``),
    without starting a Hydra job."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
