"""How fast co-running work progresses on one GPU.

A kernel's *rate* is the fraction of its solo speed it gets while others run beside it. ``rates`` gets
the kinds of everything running (serving iterations count as a kind too: ``prefill`` or ``decode``) and
the SM share given to the serving side (``None``: no partition, plain CUDA streams).

* :class:`NoInterference` — every kernel at full speed (serving-only runs, tests).
* :class:`UniformSlowdown` — a simple documented stand-in for tests and what-if runs.
* :class:`TableInterference` — driven by an interference table (``simcolo.costs.interference_table``:
  roofline defaults or measured by calibrate/): serving beside training gets the table's slowdowns.
"""
from __future__ import annotations

from typing import Protocol, Sequence

SERVING_KINDS = ("prefill", "decode")
#: the interference table's training side for each training kernel kind
TRAINING_CLASS = {"train_forward": "train", "train_backward": "train", "optimizer": "train", "lora": "lora"}


class InterferenceModel(Protocol):
    def rates(self, kinds: Sequence[str], share: float | None = None) -> list[float]:
        """Progress rate (0, 1] of each running kernel, given the kinds of all kernels running and
        the serving side's SM share (``None``: no partition)."""


class NoInterference:
    """Every kernel progresses at its solo speed, whatever runs beside it."""

    def rates(self, kinds: Sequence[str], share: float | None = None) -> list[float]:
        return [1.0] * len(kinds)


class UniformSlowdown:
    """Every kernel is slowed by ``factor`` per *other* kernel running (rate = 1/(1 + factor·(n-1))).

    A simple, documented stand-in used to exercise processor sharing in tests and what-if runs.
    """

    def __init__(self, factor: float):
        if factor < 0:
            raise ValueError(f"slowdown factor must be >= 0, got {factor}")
        self.factor = factor

    def rates(self, kinds: Sequence[str], share: float | None = None) -> list[float]:
        n = len(kinds)
        return [1.0 / (1.0 + self.factor * (n - 1))] * n if n else []


class TableInterference:
    """Rates from an interference table's pairwise slowdowns (serving kind a beside training kind b).

    Decisions: one GPU runs at most one serving iteration and one training kernel at a time in
    simcolo's layouts; if several training kernels run they also share time equally among
    themselves. Two serving kinds never co-run (an instance is one kind at a time). Training alone,
    or serving alone, runs at full speed: a partition follows the work (Harli's scheduler gives the
    finetune every SM when the decode batch is empty).
    """

    def __init__(self, table):
        self.table = table
        self._rates: dict[tuple, list[float]] = {}   # (*kinds, share) -> rates

    def rates(self, kinds: Sequence[str], share: float | None = None) -> list[float]:
        key = (*kinds, share)
        out = self._rates.get(key)
        if out is None:
            out = self._rates[key] = self._compute(kinds, share)
        return out

    def _compute(self, kinds: Sequence[str], share: float | None) -> list[float]:
        serving = [k for k in kinds if k in SERVING_KINDS]
        training = [k for k in kinds if k not in SERVING_KINDS]
        if not serving or not training:
            n = len(training)
            return [1.0 if k in SERVING_KINDS else 1.0 / n for k in kinds]
        if len(serving) > 1:
            raise ValueError(f"two serving iterations co-run on one GPU: {list(kinds)}")
        # the training side: the class of the first training kernel (all share one stream)
        b = TRAINING_CLASS.get(training[0])
        if b is None:
            raise ValueError(f"unknown training kernel kind '{training[0]}'; expected one of {sorted(TRAINING_CLASS)}")
        sd = self.table.slowdown(serving[0], b, share)
        ra, rb = 1.0 / sd[0], 1.0 / sd[1] / len(training)
        return [ra if k in SERVING_KINDS else rb for k in kinds]
