"""What every measurement needs: the model spec, the device and dtype, the timer, the seed, and the
interface each table's measurer implements."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch

from calibrate.timing import CallTimer
from simcolo.errors import SimcoloError
from simcolo.specs import ModelSpec


class CalibrationError(SimcoloError):
    """A calibration cannot produce valid tables (e.g. too few grid points fit in memory)."""


@dataclass
class Context:
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    timer: CallTimer
    seed: int = 0
    _model_key: Any = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator on the device, seeded from the run's seed (and ``salt``, per use)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + salt)
        return g

    def random_ids(self, shape: tuple[int, ...], salt: int = 0) -> torch.Tensor:
        return torch.randint(0, self.spec.vocab_size, shape, device=self.device, generator=self.generator(salt))

    def model(self, key: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model built by ``build`` for ``key``, reused while consecutive points ask for the same
        key; only one is kept, so an 8B model and its training stages never sit in memory together."""
        if key != self._model_key:
            self.drop_model()
            self._model, self._model_key = build(), key
        return self._model

    def drop_model(self) -> None:
        self._model = self._model_key = None

    def spec_for_length(self, seq_len: int) -> ModelSpec:
        """The spec with ``max_context_len`` raised to ``seq_len`` if needed. Grid points can hold longer
        sequences than the model's context (e.g. prefill of 16384 tokens in one sequence), which the
        simulator never queries but which keep the tables rectangular; only positional tables depend on
        the context length, so timing is unaffected."""
        if seq_len <= self.spec.max_context_len:
            return self.spec
        return replace(self.spec, max_context_len=seq_len)


class Measurer(Protocol):
    """One table's sweep. ``points()`` lists the grid; ``estimate_bytes`` is checked against the memory
    limit before ``measure`` runs a point and returns its rows (dicts of the table's columns)."""

    table: str

    def points(self) -> list[dict[str, Any]]: ...

    def estimate_bytes(self, point: dict[str, Any]) -> int: ...

    def measure(self, point: dict[str, Any]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...
