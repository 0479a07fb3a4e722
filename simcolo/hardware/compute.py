"""GPU compute as processor sharing.

Kernels that run at once progress at rates given by an interference model; whenever the set of
running kernels changes, every kernel's remaining work is charged for the time that passed and
finish times are recomputed. Work is measured in solo seconds (what the cost model predicts).
"""
from __future__ import annotations

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.hardware.interference import InterferenceModel, NoInterference


class Kernel:
    __slots__ = ("kind", "remaining", "rate", "done", "started_s", "_timer")

    def __init__(self, kind: str, work_s: float, done):
        self.kind = kind
        self.remaining = work_s
        self.rate = 1.0
        self.done = done
        self.started_s = 0.0
        self._timer = None


class SharedCompute:
    def __init__(self, env: SimEnvironment, interference: InterferenceModel | None = None):
        self.env = env
        self.interference = interference or NoInterference()
        self.running: list[Kernel] = []
        self._last_s = env.now
        self.busy_s = 0.0   # time with at least one kernel running

    def run(self, kind: str, work_s: float):
        """Start a kernel of ``work_s`` solo seconds; returns an event that fires when it finishes."""
        if work_s < 0:
            raise ValueError(f"negative kernel work {work_s}")
        self._charge()
        kernel = Kernel(kind, work_s, self.env.event())
        kernel.started_s = self.env.now
        self.running.append(kernel)
        self._reschedule()
        return kernel.done

    def _charge(self) -> None:
        now = self.env.now
        dt = now - self._last_s
        if dt > 0:
            if self.running:
                self.busy_s += dt
            for k in self.running:
                k.remaining = max(0.0, k.remaining - k.rate * dt)
        self._last_s = now

    def _reschedule(self) -> None:
        rates = self.interference.rates([k.kind for k in self.running])
        now = self.env.now
        for k, rate in zip(self.running, rates):
            if not 0 < rate <= 1:
                raise ValueError(f"interference model gave rate {rate} for '{k.kind}'; expected (0, 1]")
            k.rate = rate
            timer = At(self.env, now + k.remaining / rate)
            timer.callbacks.append(lambda _ev, k=k, t=timer: self._finish(k, t))
            k._timer = timer

    def _finish(self, kernel: Kernel, timer) -> None:
        if kernel._timer is not timer or kernel not in self.running:
            return  # superseded by a reschedule
        self._charge()
        self.running.remove(kernel)
        kernel.remaining = 0.0
        kernel.done.succeed(self.env.now - kernel.started_s)
        self._reschedule()
