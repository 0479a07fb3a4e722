"""GPU compute as processor sharing.

Kernels that run at once progress at rates given by an interference model; whenever the set of
running kernels changes, every kernel's remaining work is charged for the time that passed and
finish times are recomputed. Work is measured in solo seconds (what the cost model predicts).

A serving instance is a *resident*: rather than one kernel per iteration (which would defeat the
serving model's fast advance), it tells the GPU which kind of iteration it is running (``prefill``,
``decode`` or idle) and the GPU tells it the rate it progresses at, whenever that changes; the
instance re-times its own iterations (``Instance.set_rate``). ``sm_share`` is the SM fraction of the
serving side when a policy partitions the GPU (Harli); ``None`` means plain streams. ``time_slice``
interleaves the two sides in time instead (token-level interleaving, FlexLLM-style).
"""
from __future__ import annotations

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.hardware.interference import InterferenceModel, NoInterference


class Kernel:
    __slots__ = ("kind", "remaining", "rate", "done", "on_done", "started_s", "end_s", "_timer", "_timer_at")

    def __init__(self, kind: str, work_s: float, done, on_done=None):
        self.kind = kind
        self.remaining = work_s
        self.rate = 1.0
        self.done = done          # a SimPy event (``run``), or None when ``on_done`` is called instead
        self.on_done = on_done
        self.started_s = 0.0
        self.end_s = 0.0          # when it finishes at its current rate
        self._timer = None        # the live finish timer (it may fire before ``end_s``: see _reschedule)
        self._timer_at = 0.0


class SharedCompute:
    def __init__(self, env: SimEnvironment, interference: InterferenceModel | None = None, index: int = 0):
        self.env = env
        self.index = index
        self.interference = interference or NoInterference()
        self.running: list[Kernel] = []
        self.residents: dict[object, str] = {}   # resident -> kind it is running now
        self.sm_share: float | None = None
        self.time_slice: float | None = None   # training's share of time when interleaved (FlexLLM-style)
        self._last_s = env.now
        self._finishing = False  # inside a finish callback: rates are recomputed once, after it
        self.busy_s = 0.0        # time with anything running
        # busy seconds up to a time that a closed-form trainer owes the clock (work it runs without kernels
        # on a GPU of its own, see training.sync_trainer); None: none
        self.offline = None
        # a trainer advancing in closed form on this GPU (``training.lora_finetuner``): settled (its
        # kernel in progress started) before a resident changes what it runs; None: none
        self.owed = None
        self.train_busy_s = 0.0  # time with at least one kernel (training) running

    # ------------------------------------------------------------------ kernels
    def run(self, kind: str, work_s: float):
        """Start a kernel of ``work_s`` solo seconds; returns an event that fires when it finishes."""
        return self.start(kind, work_s).done

    def start(self, kind: str, work_s: float, on_done=None) -> Kernel:
        """Like :meth:`run` but returns the :class:`Kernel`, so that it can be cancelled. With
        ``on_done``, that function is called (with no argument) the moment the kernel finishes, instead
        of a SimPy event firing: a successor started from it replaces the kernel without the residents
        seeing a momentary change of rate (and without two scheduler events per kernel)."""
        if work_s < 0:
            raise ValueError(f"negative kernel work {work_s}")
        self._charge()
        kernel = Kernel(kind, work_s, None if on_done is not None else self.env.event(), on_done)
        kernel.started_s = self.env.now
        self.running.append(kernel)
        if not self._finishing:
            self._reschedule()
        return kernel

    def resume(self, kind: str, work_s: float, since: float, on_done) -> Kernel:
        """On a GPU with nothing running: a kernel of ``work_s`` solo seconds that began alone at ``since``
        (<= now; a trainer that advanced in closed form hands it over). Its time and work since then are
        charged at the next change, as if it had been started then."""
        if self.running or self.residents:
            raise ValueError(f"GPU {self.index}: a kernel resumes only on a GPU with nothing running")
        self._last_s = since
        kernel = Kernel(kind, work_s, None, on_done)
        kernel.started_s = since
        rate = kernel.rate = self.alone_rate(kind)
        self.running.append(kernel)
        kernel.end_s = end = since + work_s / rate
        self._arm(kernel, end)
        return kernel

    def work_left(self, kernel: Kernel, now: float) -> float:
        """Solo work ``kernel`` has left at ``now`` (a pure query: it is charged only at changes)."""
        return max(0.0, kernel.remaining - kernel.rate * (now - self._last_s))

    def cancel(self, kernel: Kernel) -> float:
        """Stop a running kernel without firing its event; returns the solo work it had left."""
        if kernel not in self.running:
            return 0.0
        self._charge()
        self.running.remove(kernel)
        kernel._timer = None
        self._reschedule()
        return kernel.remaining

    # ------------------------------------------------------------------ residents (serving instances)
    def set_resident(self, resident, kind: str | None) -> None:
        """``resident`` now runs iterations of ``kind`` (``None``: idle). Calls ``resident.set_rate``
        with its new rate if that changed."""
        if self.residents.get(resident) == kind:
            return
        if self.owed is not None:
            self.owed.settle(self.env.now)
        self._charge()
        if kind is None:
            self.residents.pop(resident, None)
        else:
            self.residents[resident] = kind
        self._reschedule()

    def set_share(self, share: float | None) -> None:
        """Partition the SMs: ``share`` to the serving side, the rest to training (``None``: streams)."""
        self._set_knob("sm_share", share, "SM share")

    def set_time_slice(self, fraction: float | None) -> None:
        """Interleave in time instead of co-running: while both sides have work, training kernels get
        ``fraction`` of the GPU's time and the serving side the rest, each at full speed in its slice
        (no contention, no overlap); ``None`` ends it."""
        self._set_knob("time_slice", fraction, "time slice")

    def _set_knob(self, name: str, value: float | None, what: str) -> None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"{what} must be in (0, 1), got {value}")
        if value == getattr(self, name):
            return
        self._charge()
        setattr(self, name, value)
        self._reschedule()

    def alone_rate(self, kind: str) -> float:
        """The rate a kernel of ``kind`` runs at alone on this GPU, with the knobs as set now."""
        return self.interference.rates([kind], self.sm_share)[0]

    def _rates(self, kinds: list[str]) -> list[float]:
        n = len(self.running)
        if self.time_slice is not None and n and len(kinds) > n:
            f = self.time_slice
            return [f / n] * n + [1.0 - f] * (len(kinds) - n)
        return self.interference.rates(kinds, self.sm_share)

    def add_training_busy(self, seconds: float, times: int = 1) -> None:
        """Count ``seconds`` of training kernels a closed-form trainer ran on this GPU without them (it
        is the GPU's only user, so they are busy time on both clocks), ``times`` times over: one addition
        after another, so that the clocks round exactly as they would kernel by kernel."""
        busy, train = self.busy_s, self.train_busy_s
        for _ in range(times):
            busy += seconds
            train += seconds
        self.busy_s, self.train_busy_s = busy, train

    def busy_at(self, now: float) -> float:
        """Busy seconds up to ``now`` (a pure query: counts the interval since the last change)."""
        busy = self.busy_s if self.offline is None else self.busy_s + self.offline(now)
        if self.running or self.residents:
            return busy + (now - self._last_s)
        return busy

    def train_busy_at(self, now: float) -> float:
        """Seconds with a training kernel running up to ``now`` (a pure query, like :meth:`busy_at`)."""
        return self.train_busy_s + (now - self._last_s if self.running else 0.0)

    # ------------------------------------------------------------------ internals
    def _charge(self) -> None:
        now = self.env.now
        dt = now - self._last_s
        if dt > 0:
            if self.running or self.residents:
                self.busy_s += dt
            if self.running:
                self.train_busy_s += dt
                for k in self.running:
                    k.remaining = max(0.0, k.remaining - k.rate * dt)
        self._last_s = now

    def _reschedule(self) -> None:
        """Give every kernel (and resident) its rate for the current set; a kernel whose rate did not
        change keeps its finish timer (its finish time did not change).

        A kernel slowed down keeps its timer too: when that fires early it is re-armed at the kernel's
        end (:meth:`_on_timer`), so a kernel slowed and sped up many times (training beside a serving
        instance that starts and stops) leaves one stale timer per speed-up, not one per change."""
        residents = self.residents
        running = self.running
        if residents:
            kinds = [k.kind for k in running]
            kinds += residents.values()
        elif running:
            kinds = [k.kind for k in running]
        else:
            return
        rates = self._rates(kinds)
        env = self.env
        now = env.now
        for k, rate in zip(running, rates):
            if rate == k.rate and k._timer is not None:
                continue
            if not 0 < rate <= 1:
                raise ValueError(f"interference model gave rate {rate} for '{k.kind}'; expected (0, 1]")
            k.rate = rate
            k.end_s = end = now + k.remaining / rate
            if k._timer is None or k._timer_at > end:   # none, or it would fire late: arm one at the end
                self._arm(k, end)
        if residents:
            n = len(running)
            index = self.index
            for resident, rate in zip(list(residents), rates[n:]):
                resident.set_rate(index, rate)

    def _on_timer(self, timer) -> None:
        kernel = timer._value
        if kernel._timer is not timer:
            return  # superseded: a speed-up armed an earlier timer, or the kernel was cancelled
        end = kernel.end_s
        if end > self.env.now:   # the kernel was slowed after this timer was armed: wait for its end
            self._arm(kernel, end)
            return
        self._finish(kernel)

    def _arm(self, kernel: Kernel, at: float) -> None:
        timer = At(self.env, at, kernel)
        timer.callbacks.append(self._on_timer)
        kernel._timer, kernel._timer_at = timer, at

    def _finish(self, kernel: Kernel) -> None:
        self._charge()
        self.running.remove(kernel)
        kernel.remaining = 0.0
        kernel._timer = None
        if kernel.on_done is not None:
            self._finishing = True
            try:
                kernel.on_done()
            finally:
                self._finishing = False
        else:
            kernel.done.succeed(self.env.now - kernel.started_s)
        self._reschedule()
