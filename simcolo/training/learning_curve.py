"""Model freshness as a number: the loss of a model version (optimizer steps applied) on served requests.

``power``: ``final + (initial - final) / (1 + steps / steps_scale) ** exponent`` — a smooth learning
curve with configurable ends (the default ends are placeholders until a measured curve is used).
``table``: the ``learning_curve`` table of a calibration directory (``step``, ``loss``), interpolated
linearly in steps and held at its last value beyond; where the table holds several distributions
(calibrate/ shifts the data every N steps) the first distribution's segment is used, re-based to step 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from simcolo.errors import TableError
from simcolo.paths import resolve_path

if TYPE_CHECKING:
    from simcolo.config.training import LearningCurveConfig


class LearningCurve:
    def __init__(self, steps: np.ndarray | None = None, losses: np.ndarray | None = None, *,
                 initial: float = 0.0, final: float = 0.0, steps_scale: float = 1.0, exponent: float = 1.0):
        self._steps, self._losses = steps, losses
        self.initial, self.final, self.steps_scale, self.exponent = initial, final, steps_scale, exponent

    @classmethod
    def from_config(cls, config: "LearningCurveConfig") -> "LearningCurve":
        """From the typed ``training.learning_curve`` (``simcolo.config.LearningCurveConfig``, validated when
        the config was read)."""
        if config.kind == "table":
            return cls.from_table(resolve_path(config.path))
        return cls(initial=config.initial_loss, final=config.final_loss, steps_scale=config.steps_scale,
                   exponent=config.exponent)

    @classmethod
    def from_table(cls, directory: Path) -> "LearningCurve":
        path = Path(directory) / "learning_curve.csv"
        if not path.exists():
            raise TableError(f"{path}: no learning_curve table (run calibrate/ with learning_curve measured)")
        df = pd.read_csv(path)
        missing = {"step", "loss", "distribution"} - set(df.columns)
        if missing:
            raise TableError(f"{path}: missing column(s) {sorted(missing)}; expected step, loss, distribution")
        first = df[df["distribution"] == df["distribution"].min()].sort_values("step")
        bad = ~np.isfinite(first["loss"].to_numpy(dtype=float))
        if bad.any():
            raise TableError(f"{path}: line {int(first.index[bad][0]) + 2}: loss is not a finite number")
        steps = first["step"].to_numpy(dtype=float)
        return cls(steps - steps[0], first["loss"].to_numpy(dtype=float))

    def loss(self, steps) -> np.ndarray:
        s = np.asarray(steps, dtype=float)
        if self._steps is not None:
            return np.interp(s, self._steps, self._losses)
        return self.final + (self.initial - self.final) / (1.0 + s / self.steps_scale) ** self.exponent
