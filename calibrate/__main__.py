"""``python -m calibrate model=<name> device=<cpu|cuda> out=<dir>``: measure and write a cost-table
directory (Hydra app over ``conf/calibrate.yaml``, shipped in the package; see that file for every key).

``out`` is relative to the working directory; ``--config-dir DIR`` adds a config directory of your own
(``DIR/model/<name>.yaml`` for a model the project does not ship)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from simcolo.errors import SimcoloError
from simcolo.paths import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="calibrate")
def main(cfg: DictConfig) -> None:
    from calibrate.harness import run

    try:
        _pass_config_dir(cfg)
        run(cfg)
    except SimcoloError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("calibrate: interrupted; every point measured so far is kept in <out>/.progress.jsonl: run "
              "the same command again to continue", file=sys.stderr)
        sys.exit(130)


def _pass_config_dir(cfg: DictConfig) -> None:
    """``--config-dir DIR`` reaches the engine run too (its replay reads the same ``model=<name>``)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if cfg.get("engine_run") is None or cfg.engine_run.get("config_dir") is not None:
        return
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            with open_dict(cfg):
                cfg.engine_run.config_dir = source.path
            return


if __name__ == "__main__":
    main()
