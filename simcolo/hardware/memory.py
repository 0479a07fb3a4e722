"""GPU memory as one pool of bytes shared by named uses (weights, KV blocks, activations, ...).

The pool never goes over capacity: an allocation that does not fit raises ``OutOfMemory`` (callers
that can wait ask ``fits`` first). Uses are named so memory timelines can be broken down.
"""
from __future__ import annotations

from collections import defaultdict


class OutOfMemory(RuntimeError):
    pass


class MemoryPool:
    def __init__(self, capacity_bytes: float, name: str = "gpu"):
        if capacity_bytes <= 0:
            raise ValueError(f"{name}: memory capacity must be > 0, got {capacity_bytes}")
        self.name = name
        self.capacity = float(capacity_bytes)
        self.used = 0.0
        self.peak = 0.0
        self.by_use: dict[str, float] = defaultdict(float)

    @property
    def free(self) -> float:
        return self.capacity - self.used

    def fits(self, nbytes: float) -> bool:
        return self.used + nbytes <= self.capacity

    def allocate(self, use: str, nbytes: float) -> None:
        if nbytes < 0:
            raise ValueError(f"{self.name}: negative allocation {nbytes} for '{use}'")
        if not self.fits(nbytes):
            raise OutOfMemory(
                f"{self.name}: cannot allocate {nbytes / 2**30:.2f} GiB for '{use}': "
                f"{self.used / 2**30:.2f} of {self.capacity / 2**30:.2f} GiB in use "
                f"({', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in self.by_use.items() if v)})")
        self.used += nbytes
        self.by_use[use] += nbytes
        if self.used > self.peak:
            self.peak = self.used

    def release(self, use: str, nbytes: float) -> None:
        if nbytes < 0 or nbytes > self.by_use[use] + 1e-6:
            raise ValueError(f"{self.name}: releasing {nbytes} bytes of '{use}' but only "
                             f"{self.by_use[use]} are held")
        self.by_use[use] -= nbytes
        self.used -= nbytes
