"""What every thread of a live replay shares: the wall clock, one lock over all scheduler state, and
the first failure (which stops the replay)."""
from __future__ import annotations

import threading
import time


class LiveContext:
    """``now`` is seconds since ``start()`` on the wall clock (the trace's timeline). Scheduler state
    (instances, trainers, the policy's views) changes only under ``lock``; kernels run outside it."""

    def __init__(self, device_name: str):
        self.device_name = device_name
        self.lock = threading.RLock()
        self.stopped = False
        self.failure: str | None = None
        self.failure_exc: BaseException | None = None
        self._t0: float | None = None
        self._conditions: list[threading.Condition] = []

    # ------------------------------------------------------------------ clock
    def start(self) -> None:
        self._t0 = time.perf_counter()

    @property
    def now(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    # ------------------------------------------------------------------ threads
    def condition(self) -> threading.Condition:
        """A condition on the shared lock; ``stop`` wakes every one made here."""
        cond = threading.Condition(self.lock)
        self._conditions.append(cond)
        return cond

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for cond in self._conditions:
                cond.notify_all()

    def fail(self, where: str, exc: BaseException) -> None:
        """A thread hit an error (CUDA out of memory, a kernel error): remember the first, stop all."""
        with self.lock:
            if self.failure is None:
                self.failure = f"{where}: {type(exc).__name__}: {exc}"
                self.failure_exc = exc
        self.stop()

    def run_guarded(self, where: str, device, body) -> None:
        """A replay thread's ``body``: on its own CUDA stream on a GPU; any exception (a CUDA
        out-of-memory, a kernel error) is recorded as the replay's failure and stops every thread."""
        import torch

        try:
            if device.type == "cuda":
                with torch.cuda.stream(torch.cuda.Stream(device)):
                    body()
            else:
                body()
        except BaseException as exc:  # noqa: BLE001 - reported, and the replay stops with it
            self.fail(f"{where} on {device}", exc)

    def synchronize(self, device) -> None:
        """Wait for this thread's kernels (its own CUDA stream); a no-op on the CPU."""
        import torch

        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
