"""Compose the project's Hydra config outside the CLI (tests, benchmarks, notebooks, the fidelity runner)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from simcolo.errors import ConfigError
from simcolo.paths import CONF_DIR


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config",
                config_dir: str | Path | None = None) -> DictConfig:
    """The config ``simcolo <overrides>`` would run (``config_name="calibrate"``: ``python -m calibrate``,
    ``"replay"``: ``python -m simcolo.replay``), without starting a Hydra job.

    ``config_dir``: a user's own config directory, as ``--config-dir DIR`` adds it on the command line:
    searched after the shipped configs (``hydra.searchpath``, the position Hydra 1.3 gives ``--config-dir``),
    so its new group options (``model/mine.yaml``) can be picked, while a file named like a shipped one does
    not replace it.
    """
    overrides = list(overrides)
    if config_dir is not None:
        directory = Path(config_dir).expanduser().resolve()
        if not directory.is_dir():
            raise ConfigError(f"config directory {directory} not found")
        overrides.append(f"hydra.searchpath=[file://{directory}]")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
