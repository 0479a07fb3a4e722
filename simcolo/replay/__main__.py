"""``python -m simcolo.replay policy=... workload=... device=cpu|cuda``: a Hydra app around
:func:`simcolo.replay.run.replay` (config ``conf/replay.yaml``: the simulation's config plus ``device``
and ``replay``)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simcolo.errors import SimcoloError
from simcolo.paths import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="replay")
def _app(cfg: DictConfig) -> None:
    from simcolo.cli import report_error, report_run
    from simcolo.replay.run import replay

    logging.captureWarnings(True)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = replay(cfg, out_dir)
    except SimcoloError as exc:   # a bad config: 2; a replay that failed while running (ReplayFailed): 3
        report_error("simcolo.replay", exc)
        sys.exit(getattr(exc, "exit_code", 2))
    report_run("simcolo.replay", result.summary, cfg.model.max_context_len, cfg.metrics.quiet,
               f"replayed on {result.summary['replay_device']}; outputs: {out_dir}")


if __name__ == "__main__":
    _app()
