"""Pipeline schedules: the ordered forward (F) and backward (B) operations each stage runs in one step.

Pure functions, no simulation: ``gpipe`` and ``one_f_one_b`` return, per stage, a list of ``Op``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Op:
    kind: Literal["F", "B"]
    micro_batch: int


def _check(num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1 or num_micro_batches < 1:
        raise ValueError(f"a pipeline needs >= 1 stage and >= 1 micro-batch, got {num_stages} and "
                         f"{num_micro_batches}")


def gpipe(num_stages: int, num_micro_batches: int) -> list[list[Op]]:
    """GPipe: every stage runs all forwards, then all backwards (last micro-batch first).
    Stage 0 holds the activations of every micro-batch until its backwards start."""
    _check(num_stages, num_micro_batches)
    m = num_micro_batches
    ops = [Op("F", i) for i in range(m)] + [Op("B", i) for i in reversed(range(m))]
    return [list(ops) for _ in range(num_stages)]


def one_f_one_b(num_stages: int, num_micro_batches: int) -> list[list[Op]]:
    """1F1B (PipeDream-flush, Megatron): stage s runs min(S - s - 1, M) warm-up forwards, then
    alternates one forward and one backward, then drains the remaining backwards. Stage s never holds
    more than S - s micro-batches' activations; the step time equals GPipe's."""
    _check(num_stages, num_micro_batches)
    out = []
    for s in range(num_stages):
        warm = min(num_stages - s - 1, num_micro_batches)
        ops = [Op("F", i) for i in range(warm)]
        f, b = warm, 0
        while f < num_micro_batches:
            ops += [Op("F", f), Op("B", b)]
            f, b = f + 1, b + 1
        ops += [Op("B", i) for i in range(b, num_micro_batches)]
        out.append(ops)
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}
