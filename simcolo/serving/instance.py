"""The simulator's driver of a serving instance: SimPy timer events over the batch scheduler's rules.

One instance is one model replica on ``tp`` GPUs. :class:`Instance` *is* a
:class:`~simcolo.serving.batch_scheduler.BatchScheduler` (the vLLM rules, shared with the live replay)
plus the simulated clock: each iteration boundary is one timer event whose callback completes what ran
and starts what runs next; an iteration takes the cost model's solo latency / ``rate``.

Fast advance. Between events that change the batch (an arrival, a completion, a preemption), decode
iterations are deterministic, so the instance advances them together: it computes every iteration's
latency with one vectorised cost-model call and their end times with ``numpy.cumsum`` (the same
left-to-right sum an iteration-by-iteration run performs), waits for the first completion or block
shortage in one event, and cuts the run short at the next iteration boundary when the batch changes
(:meth:`_cut_run`: an arrival, KV blocks lent away, a rate change). Results equal the
iteration-by-iteration mode bit for bit; a test compares the two.

Co-location (inert unless attached): an instance tells its GPUs' shared compute what it runs
(``prefill``, ``decode``, idle) and takes the rate they give back (``set_rate``): a rate change re-times
the iteration in progress and cuts a decode run after it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from simcolo.hardware.environment import At, SimEnvironment
from simcolo.serving.batch_scheduler import ROLES, BatchingConfig, BatchScheduler
from simcolo.workload.request import Request

__all__ = ["Instance", "BatchingConfig", "ROLES"]

_IDLE, _WAKING, _BUSY, _HORIZON = 0, 1, 2, 3


class Instance(BatchScheduler):
    def __init__(self, env: SimEnvironment, index: int, role: str, gpus: list[int], cost, cfg: BatchingConfig,
                 num_blocks: int, on_done: Callable[[Request], None], itl,
                 on_prefilled: Callable[[Request, "Instance"], None] | None = None):
        super().__init__(index, role, gpus, cost, cfg, num_blocks, on_done, itl, on_prefilled)
        self.env = env
        self._fast = cfg.fast_advance
        self._state = _IDLE
        self._started = 0.0      # start of the iteration (or decode run) in flight
        self._plan = None        # the single iteration in flight
        self._cut = False        # the decode run in flight was already cut at its next boundary
        self._gen = 0            # generation of the live timer; older ones are stale
        self._h_ends: np.ndarray | None = None
        self._h_n = 0
        self._end = 0.0          # end of the single iteration in flight
        # --- co-location (all inert in a serving-only run) ---
        self.rate = 1.0          # progress rate on its GPUs (1: solo); iterations take solo latency / rate
        self._gpu_rates: dict[int, float] = {}
        self._computes: list = []       # the GPUs' SharedCompute, told what this instance runs
        self.running_kind: str | None = None   # what it runs now: "prefill", "decode" or None (idle)
        self.on_iteration: Callable[["Instance", str], None] | None = None  # called as an iteration starts
        self.max_horizon: int | None = None   # cap on decode iterations advanced as one event

    # ------------------------------------------------------------------ the iteration loop
    def batch_changed(self) -> None:
        state = self._state
        if state == _IDLE:
            self._state = _WAKING
            At(self.env, self.env.now).callbacks.append(self._boundary)
        elif state == _HORIZON and not self._cut:
            # The batch changes at the next iteration boundary: cut the decode run there. Iterations
            # ending before now are done; the one in progress (or ending exactly now) completes.
            self._cut_run(int(self._h_ends.searchsorted(self.env.now)))

    def _cut_run(self, c: int, retimed: bool = False) -> None:
        """End the decode run in flight after its iteration ``c`` (0-based; the run shortens, never
        grows); the next boundary re-plans. ``retimed``: iteration ``c``'s end moved (a rate change),
        so its timer is re-armed even if it was the run's last."""
        self._cut = True
        if c + 1 < self._h_n or retimed:
            self._h_n = c + 1
            self._arm_timer(self._h_ends.item(c))

    # Each iteration boundary is one timer event whose callback completes what ran and starts what
    # runs next. (A generator process would cost a resume plus a wake-up event per boundary, and
    # this is the simulator's hot path.)
    def _boundary(self, _event=None) -> None:
        now = self.env.now
        state = self._state
        if state == _BUSY:
            self.busy_s += now - self._started
            self.iterations += 1
            self.complete_iteration(self._plan, now)
        elif state == _HORIZON:
            self.busy_s += self._h_ends.item(self._h_n - 1) - self._started
            self.complete_decode_run(self._h_ends, self._h_n)
        self._state = _WAKING   # planning: a rate change now only sets the rate
        self._started = now
        if self._fast and self.running and not self.prefilling and self.admission_blocked():
            n = self.decode_iterations_before_change()
            if self.max_horizon is not None and n > self.max_horizon:
                n = self.max_horizon
            if n > 0:
                if self._computes or self.on_iteration is not None:
                    self._begin("decode")
                self._start_run(n, now)
                return
        plan = self.plan_iteration(now)
        if plan is None:
            self._state = _IDLE
            if self.running_kind is not None:
                self._begin(None)
            return
        if self._computes or self.on_iteration is not None:
            self._begin("prefill" if plan[1] else "decode")
        self._state = _BUSY
        self._plan = plan
        rate = self.rate
        self._end = now + (plan[0] if rate == 1.0 else plan[0] / rate)
        self._arm_timer(self._end)

    def _start_run(self, n: int, start: float) -> None:
        """Run ``n`` decode iterations of the current batch as one event (cut short by ``_cut_run``)."""
        buf = np.empty(n + 1)
        buf[0] = start
        self.cost.decode_run_s(len(self.running), self.kv_total, buf[1:])
        if self.rate != 1.0:
            buf[1:] /= self.rate
        buf.cumsum(out=buf)  # the same left-to-right sum as one iteration after another
        self._h_ends, self._h_n = buf[1:], n
        self._state, self._cut = _HORIZON, False
        self._arm_timer(buf.item(n))

    def _arm_timer(self, at: float) -> None:
        self._gen += 1
        At(self.env, at, self._gen).callbacks.append(self._on_timer)

    def _on_timer(self, timer) -> None:
        if timer.value == self._gen:  # else superseded by a cut
            self._boundary()

    # ------------------------------------------------------------------ co-location
    def attach(self, computes: list) -> None:
        """Run on these GPUs' shared compute: tell them what runs, take the rate they give."""
        self._computes = list(computes)

    @property
    def attached(self) -> bool:
        """True if it runs on shared compute (its GPUs' busy clocks then count its iterations)."""
        return bool(self._computes)

    def _begin(self, kind: str | None) -> None:
        if kind != self.running_kind:
            self.running_kind = kind
            for c in self._computes:
                c.set_resident(self, kind)
        if kind is not None and self.on_iteration is not None:
            self.on_iteration(self, kind)

    def set_rate(self, gpu: int, rate: float) -> None:
        """GPU ``gpu`` now gives this instance ``rate``; the instance runs at the slowest of its GPUs'.
        The iteration in progress keeps the work it has done and finishes the rest at the new rate;
        a decode run is cut after it."""
        rates = self._gpu_rates
        if rates.get(gpu) == rate:
            return
        rates[gpu] = rate
        new = min(rates.values())
        old = self.rate
        if new == old:
            return
        self.rate = new
        now = self.env.now
        if self._state == _BUSY:
            end = self._end
            if end > now:
                self._end = now + (end - now) * old / new
                self._arm_timer(self._end)
        elif self._state == _HORIZON:
            ends = self._h_ends
            c = int(ends.searchsorted(now))   # the iteration in progress (or ending exactly now)
            if c >= self._h_n:
                return
            end = ends.item(c)
            if end > now:
                ends[c] = now + (end - now) * old / new
            self._cut_run(c, retimed=True)

    def _blocks_lent(self) -> None:
        # The decode run's block-safe length assumed the old free count: cut it unless the whole run
        # still fits (its growth is charged to free_blocks only when it ends).
        if self._state == _HORIZON and not self._cut and not self.run_fits_free_blocks(self._h_n):
            self.batch_changed()

    # ------------------------------------------------------------------ views (pure queries)
    def _iterations_done(self, now: float) -> int:
        if self._state != _HORIZON:
            return 0
        done = int(self._h_ends.searchsorted(now))
        return done if done < self._h_n else self._h_n

    def outstanding_tokens(self, now: float) -> int:
        """Tokens of work left on this instance at ``now`` (decode iterations in flight included)."""
        if self._state != _HORIZON:
            return self.outstanding
        return self.outstanding - len(self.running) * self._iterations_done(now)

    def kv_blocks_used(self, now: float) -> int:
        done = self._iterations_done(now)
        used = self.num_blocks - self.free_blocks
        if done:
            used += self.blocks_grown(done)
        return used
