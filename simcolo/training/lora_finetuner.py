"""LoRA finetuning inside a decode instance (Harli and its co-location baselines).

One finetuner per decode instance (tp 1). It trains micro-batches of sequences taken from a pool
shared by all finetuners (the finetune jobs' tasks). Before each micro-batch it asks the policy for a
plan — the SM share of decode and the micro-batch size (``plan_finetune``) — borrows the micro-batch's
activation memory from the instance's KV block pool (the unified pool), and runs forward + backward as
one ``lora`` kernel beside the decode iterations. Every ``global_batch`` micro-batches it runs the
adapter's optimizer step (the adapter version advances).

Memory (``static_memory`` false, Harli): decode has priority — when decode needs blocks the finetuner
holds, the instance reclaims them at once; the micro-batch is aborted, its sequences go back to the
pool and are recomputed later (counted in ``aborted_microbatches``). With ``static_memory`` true (the
static-share baseline) the blocks are a fixed carve-out that decode cannot reclaim (it preempts
requests instead). The SM share is re-planned at every decode iteration start (``on_iteration``).

On an idle decode instance the simulated finetuner repeats one micro-batch: it advances them in closed
form, as a *chain* settled when something touches it (see the section "idle chains" of
:class:`LoraFinetuner`), which the pool's counting in FIFO order (:class:`SequencePool`) makes exact.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable

import numpy as np

from simcolo.hardware.environment import At
from simcolo.metrics.training_summary import TrainerReport
from simcolo.policies.base import FinetuneState
from simcolo.training.data import TrainTask


class SequencePool:
    """The finetune jobs' sequences, shared by every finetuner, counted in FIFO order.

    Sequences are handed out and trained by count: the next ``take`` hands out the sequences after the
    ones already handed, an aborted micro-batch gives its count back, and a task is done when the
    sequences trained, counted from the front, cover it (a task whose sequences went to several
    finetuners is done when as many sequences as the tasks up to it hold have been trained, not when
    those very sequences have). Counting makes the pool's state a function of how many sequences were
    taken and trained, whatever the order the finetuners did it in, so a finetuner that advances many
    micro-batches in closed form (:class:`LoraFinetuner`'s idle chains) settles them in bulk with the same
    result. With a backlog supply (``recycle`` set) the tasks done in bulk are replaced by equal ones at
    once (the same objects queued again, as the isolated trainer does)."""

    def __init__(self):
        self.tasks: deque[TrainTask] = deque()   # not yet done, FIFO
        self.available = 0       # sequences not handed out
        self._handed = 0         # handed out and not finished (past the front's finished ones)
        self._front_done = 0     # sequences of the front task trained
        self.waiters: list = []
        self.recycle: Callable[[int], None] | None = None   # backlog: n tasks done and replaced, in bulk
        self.chained = 0         # finetuners advancing in closed form now

    def add(self, task: TrainTask) -> None:
        self.tasks.append(task)
        self.available += task.micro_batch
        for w in self.waiters:
            w.wake()

    def counters(self) -> dict:
        return {"train_queued_sequences": self.available}

    def take(self, n: int) -> list[tuple[TrainTask, int]]:
        """Hand out up to ``n`` sequences; returns [(task, count)], the tasks they belong to."""
        k = min(n, self.available)
        out, skip = [], self._front_done + self._handed
        for task in self.tasks:
            if k == 0:
                break
            if skip >= task.micro_batch:
                skip -= task.micro_batch
                continue
            c = min(k, task.micro_batch - skip)
            out.append((task, c))
            k -= c
            skip = 0
        got = sum(c for _, c in out)
        self.available -= got
        self._handed += got
        return out

    def put_back(self, taken) -> None:
        k = sum(c for _, c in taken)
        self.available += k
        self._handed -= k

    def finish(self, taken, now: float) -> list[TrainTask]:
        """The sequences of ``taken`` are trained: returns the tasks that completes (finish time ``now``)."""
        k = sum(c for _, c in taken)
        self._handed -= k
        self._front_done += k
        done = []
        while self.tasks and self._front_done >= self.tasks[0].micro_batch:
            task = self.tasks.popleft()
            self._front_done -= task.micro_batch
            task.finish_s = now
            done.append(task)
        return done

    def trained_in_bulk(self, sequences: int) -> None:
        """A finetuner's chain took and trained ``sequences``, with a backlog supply: every task that
        completes is replaced by an equal one at once (counted by ``recycle``), so the queue keeps its
        tasks, rotated."""
        self._front_done += sequences
        m = self.tasks[0].micro_batch
        done = self._front_done // m
        if done:
            self._front_done -= done * m
            self.available += done * m - sequences
            self.tasks.rotate(-(done % len(self.tasks)))
            self.recycle(done)
        else:
            self.available -= sequences

    def chain_slack(self) -> int:
        """Sequences the finetuners may hold in flight at once with every take still served in full: with
        a backlog of B tasks of m sequences, counted in FIFO order, at least B*m - (m - 1) minus those in
        flight are available whenever a micro-batch is taken."""
        m = self.tasks[0].micro_batch if self.tasks else 0
        return len(self.tasks) * m - (m - 1)

    def settle_chains(self, now: float, blocks_only: bool = False) -> None:
        """Settle every finetuner advancing in closed form up to ``now`` (see ``LoraFinetuner``);
        ``blocks_only``: only those whose blocks lent differ from what a chain keeps lent (in an optimizer
        step), all that routing, a decode instance taking a request and a timeline sample read of them (the
        busy clocks through ``SharedCompute.offline``; the instance settles its finetuner before it runs)."""
        if self.chained:
            for ft in self.waiters:
                if not blocks_only or ft.in_optimizer_step(now):
                    ft.settle(now)


def finetune_state(inst, held_blocks: int) -> FinetuneState:
    """What a finetune policy sees of decode instance ``inst`` (any backend's ``BatchScheduler``)."""
    return FinetuneState(len(inst.running), inst.kv_total, inst.lendable_blocks(), held_blocks)


def fit_micro_batch(predictor, mb: int, seq_len: int, static_memory: bool, held: int, lendable: int
                    ) -> tuple[int, int]:
    """(micro-batch, KV blocks to borrow for it): ``mb`` shrunk to what memory allows -- the static
    carve-out already ``held`` (nothing more to borrow), or the ``lendable`` blocks of the instance."""
    if static_memory:
        return min(mb, predictor.lora_max_micro_batch(held)), 0
    need = predictor.lora_blocks(mb, seq_len)
    while mb > 0 and need > lendable:
        mb -= 1
        need = predictor.lora_blocks(mb, seq_len)
    return mb, need


#: stands for the kernel while a finetuner advances in closed form (``LoraFinetuner.settle``)
CHAINED = object()

#: bound on the plans a finetuner keeps (for checks and analysis)
MAX_PLANS = 100_000


class FinetunerRules:
    """What the simulated and the live finetuner share: the policy's view of the instance, the plan log,
    the re-plan as a serving iteration starts, and the report. Needs ``now``, ``inst``, ``held``, ``plans``,
    ``policy``, ``predictor``, ``pool``, ``mb``, the counters, and ``_abort``, ``_release_blocks``,
    ``_apply`` and ``wake``."""

    def state(self) -> FinetuneState:
        return finetune_state(self.inst, self.held)

    def _log_plan(self, knob, mb, predicted) -> None:
        if len(self.plans) < MAX_PLANS:
            self.plans.append((self.now, len(self.inst.running), self.inst.kv_total, knob, mb, predicted))

    def _replan(self, in_flight: bool, idle: bool) -> None:
        """As a serving iteration starts: re-plan the knob for the micro-batch ``in_flight`` (a plan of
        micro-batch 0 means no knob keeps decode within its SLO: the finetune yields, aborted and
        recomputed later), or, ``idle`` with sequences queued, try to start one."""
        if in_flight:
            knob, mb, predicted = self.policy.plan_finetune(self.state(), self.predictor, self.mb)
            self._log_plan(knob, mb, predicted)
            if mb == 0:
                self._abort()
                self._release_blocks()
            else:
                self._apply(knob)
        elif idle and self.pool.available:
            self.wake()

    def report(self) -> TrainerReport:
        return TrainerReport(self.sequences_done, self.tokens_done, counters={
            "finetune_aborted_microbatches": self.aborted_microbatches, "finetune_microbatches": self.micro_batches,
            "finetune_microbatches_in_chains": self.chained_microbatches,
            "decode_waits_on_finetune_blocks": self.inst.waits_on_lent_blocks})


class LoraFinetuner(FinetunerRules):
    def __init__(self, env, instance, gpu, pool: SequencePool, policy, predictor, seq_len: int,
                 global_batch: int, static_memory: bool, on_task_done, on_step, on_steps=None, chains: bool = False):
        self.env, self.inst, self.gpu, self.pool = env, instance, gpu, pool
        self.policy, self.predictor = policy, predictor
        self.seq_len, self.global_batch, self.static_memory = seq_len, global_batch, static_memory
        self.on_task_done, self.on_step = on_task_done, on_step
        self.on_steps = on_steps    # (first version, starts, ends, tokens): steps a chain made, as arrays
        self.kernel = None
        self.taken = None
        self.mb = 0
        self.held = 0
        self.micro_batches = 0
        self.version = 0
        self.tokens_done = 0
        self.sequences_done = 0
        self.aborted_microbatches = 0
        self.chained_microbatches = 0   # of them, advanced in closed form (idle chains)
        # every plan asked of the policy: (time, decode batch, KV tokens, share, micro-batch, predicted
        # co-run decode latency); bounded, for checks and analysis
        self.plans: list[tuple[float, int, int, float | None, int, float]] = []
        self._wake_pending = False
        self._finishing = False   # inside _done: it starts the next micro-batch itself, no wake needed
        self._step_start = env.now        # when the current optimizer step's first micro-batch could start
        self.chains = chains              # advance idle micro-batches in closed form (see ``settle``)
        self._chain: tuple[float, int, float, float] | None = None   # start, r0, micro-batch s, optimizer s
        self._tokens_at_step = 0
        instance.on_iteration = self._on_iteration
        if not static_memory:
            instance.lender = self
        pool.waiters.append(self)

    @property
    def now(self) -> float:
        return self.env.now

    # ------------------------------------------------------------------ events
    def wake(self) -> None:
        if not self._wake_pending and self.kernel is None and not self._finishing:
            self._wake_pending = True
            At(self.env, self.env.now).callbacks.append(self._woken)

    def _woken(self, _ev) -> None:
        self._wake_pending = False
        self._try_start()

    def _on_iteration(self, inst, kind: str) -> None:
        """A decode iteration (or run) starts: re-plan the SM split for the micro-batch running."""
        if self._chain is not None:
            self.settle(self.env.now)
        self._replan(self.kernel is not None and self.taken is not None, self.kernel is None)

    def _try_start(self) -> None:
        if self.kernel is not None:
            return
        if not self.pool.available:
            self._idle()
            return
        state = self.state()
        share, mb, predicted = self.policy.plan_finetune(state, self.predictor, None)
        mb = min(mb, self.pool.available)
        self._log_plan(share, mb, predicted)
        # static memory: the carve-out is already held (reserve_static)
        mb, need = fit_micro_batch(self.predictor, mb, self.seq_len, self.static_memory, self.held,
                                   state.lendable_blocks)
        if mb <= 0:
            self._idle()
            return   # woken again at the next decode iteration or when sequences arrive
        if need:
            self.inst.lend(need)
            self.held += need
        self._apply(share)
        self.mb = mb
        if self._may_chain(mb):
            self._start_chain()
            return
        self.taken = self.pool.take(mb)
        work = self.predictor.lora_step_s(mb, self.seq_len)
        self.kernel = self.gpu.compute.start("lora", work, self._done)

    def _apply(self, knob: float | None) -> None:
        if self.policy.sharing == "time_slice":
            self.gpu.compute.set_time_slice(knob)
        else:
            self.gpu.compute.set_share(knob)

    def reserve_static(self, blocks: int) -> None:
        """Static-share baseline: carve ``blocks`` out of the KV pool for good."""
        self.inst.lend(blocks)
        self.held = blocks

    def _release_blocks(self) -> None:
        if not self.static_memory and self.held:
            self.inst.give_back(self.held)
            self.held = 0

    def _done(self) -> None:
        now = self.env.now
        self.kernel = None
        self._release_blocks()
        self.micro_batches += 1
        self.sequences_done += self.mb
        self.tokens_done += self.mb * self.seq_len
        self._finishing = True
        try:
            for task in self.pool.finish(self.taken, now):
                self.on_task_done(task)   # may add tasks to the pool (and wake the other finetuners)
        finally:
            self._finishing = False
        self.taken = None
        if self.micro_batches % self.global_batch == 0:
            # the optimizer step runs before the next micro-batch
            self.kernel = self.gpu.compute.start("lora", self.predictor.lora_optimizer_s(), self._stepped)
            return
        self._try_start()

    def _stepped(self) -> None:
        self.kernel = None
        self.version += 1
        self.on_step(self.version, self._step_start, self.env.now, self.tokens_done - self._tokens_at_step)
        self._tokens_at_step = self.tokens_done
        self._step_start = self.env.now
        self._try_start()

    def reclaim(self, inst) -> None:
        """Decode needs the blocks: abort the micro-batch in flight and give every block back now."""
        if self._chain is not None:
            self.settle(self.env.now)
        self._abort()
        self._release_blocks()

    def _abort(self) -> None:
        if self.kernel is not None and self.taken is not None:
            self.gpu.compute.cancel(self.kernel)
            self.pool.put_back(self.taken)
            self.taken = None
            self.kernel = None
            self.aborted_microbatches += 1
            self._idle()

    # ------------------------------------------------------------------ idle chains (closed form)
    # A finetuner on a decode instance with nothing to serve runs the same micro-batch again and again: the
    # plan of an idle instance is the same each time (a policy's plan for an idle state depends on nothing
    # else), the kernel runs alone at one rate, and every ``global_batch`` micro-batches the optimizer step
    # follows. So it advances them in closed form: a *chain* holds where the first micro-batch started, and
    # the micro-batches and steps done by any time follow by arithmetic. Nothing happens on the clock
    # until something touches the finetuner (a request is routed to a decode instance or reaches one, its
    # instance starts an iteration or takes blocks back, the GPU gets a resident, a timeline sample, the run
    # ends): then ``settle`` credits what the chain did by then (sequences,
    # tasks, steps and their records, busy time) and turns the micro-batch or optimizer step in progress
    # back into a kernel with the work it has left. The results equal a run micro-batch by micro-batch
    # (``sim.training_spans=false``) up to float rounding of the summed times (a test compares them).
    # Conditions, checked as a micro-batch starts: a backlog supply (tasks are replaced in bulk), the
    # instance idle and alone on its GPU, every other finetuner busy (an idle one is woken by the tasks a
    # finetuner completes, so while one waits everything runs step by step), and the micro-batches in
    # flight within the pool's slack (every take is then served in full, as it would be one by one).

    def _may_chain(self, mb: int) -> bool:
        pool, inst, compute = self.pool, self.inst, self.gpu.compute
        if not self.chains or pool.recycle is None:
            return False
        if inst.running or inst.waiting or inst.prefilling or compute.running or compute.residents:
            return False
        in_flight = mb
        for ft in pool.waiters:
            if ft is not self:
                if ft.kernel is None:
                    return False
                in_flight += ft.mb
        return in_flight <= pool.chain_slack()

    def _start_chain(self) -> None:
        compute = self.gpu.compute
        rate = compute.alone_rate("lora")
        self._chain = (self.env.now, self.micro_batches % self.global_batch,
                       self.predictor.lora_step_s(self.mb, self.seq_len) / rate,
                       self.predictor.lora_optimizer_s() / rate)
        self.kernel = CHAINED
        self.pool.chained += 1
        compute.owed, compute.offline = self, self._chain_busy_s

    def _micro_batch_end(self, j: int) -> float:
        """When the chain's ``j``-th micro-batch ends (1-based; 0: when the chain began)."""
        t0, r0, d, opt = self._chain
        return t0 + j * d + ((r0 + j - 1) // self.global_batch) * opt if j else t0

    def _chain_position(self, now: float) -> tuple[int, int, str, float]:
        """(micro-batches done, optimizer steps done, what is in progress ("mb" or "opt"), when it began)."""
        t0, r0, d, opt = self._chain
        G = self.global_batch
        # E(j) is within one optimizer step of t0 + j (d + opt / G): bracket from that guess, then bisect
        guess, margin = int((now - t0) / (d + opt / G)), int(opt / d) + 2
        lo, hi = max(guess - margin, 0), guess + margin
        if self._micro_batch_end(lo) > now:
            lo = 0
        while self._micro_batch_end(hi) <= now:   # float rounding at the edge
            lo, hi = hi, hi + margin
        while hi - lo > 1:   # the last micro-batch ended by now: E(lo) <= now < E(hi)
            mid = (lo + hi) // 2
            if self._micro_batch_end(mid) <= now:
                lo = mid
            else:
                hi = mid
        n = lo
        end = self._micro_batch_end(n)
        steps = (r0 + n) // G
        if n and (r0 + n) % G == 0:
            if end + opt > now:
                return n, steps - 1, "opt", end
            end += opt
        return n, steps, "mb", end

    def in_optimizer_step(self, now: float) -> bool:
        """True if a chain is running its optimizer step at ``now``: one of the micro-batches that end a
        global batch ended at E <= now < E + opt. The chain's optimizer steps start a period of G micro-batches
        and a step apart, so the step in question is found by division and checked, with its neighbours
        (float rounding at the edges), on the very end times ``_chain_position`` reads (timeline samples
        and routing ask this of every chain; a search per ask cost more than the rest of the sample)."""
        if self._chain is None:
            return False
        t0, r0, d, opt = self._chain
        G = self.global_batch
        first = G - r0                       # the micro-batch the first optimizer step follows
        q = math.floor((now - t0 - first * d) / (G * d + opt))
        for j in (first + (q - 1) * G, first + q * G, first + (q + 1) * G):
            if j >= 1:
                end = self._micro_batch_end(j)
                if end <= now < end + opt:
                    return True
        return False

    def _chain_busy_s(self, now: float) -> float:
        """Busy time the chain owes its GPU's clocks up to ``now`` (the GPU's ``busy_at`` adds it)."""
        return now - self._chain[0] if self._chain is not None else 0.0

    def settle(self, now: float, materialize: bool = True) -> None:
        """Credit what the chain did up to ``now`` and end it; ``materialize``: the micro-batch or optimizer
        step in progress goes on as a kernel that began when it did (at the end of the run it stays
        uncounted, as an unfinished kernel's time is)."""
        if self._chain is None:
            return
        t0, r0, d, opt = self._chain
        n, steps, doing, began = self._chain_position(now)
        G, mb, seq = self.global_batch, self.mb, self.seq_len
        compute = self.gpu.compute
        compute.owed = compute.offline = None
        self.pool.chained -= 1
        compute.add_training_busy(began - t0)
        self.micro_batches += n
        self.chained_microbatches += n
        self.sequences_done += n * mb
        tokens0 = self.tokens_done
        self.tokens_done += n * mb * seq
        if n:
            self.pool.trained_in_bulk(n * mb)
        if steps:   # the optimizer steps the chain finished, as ``_stepped`` makes them
            q = np.arange(1, steps + 1)
            j = q * G - r0                   # the micro-batch each follows
            ends = t0 + j * d + q * opt
            tokens = tokens0 + j * (mb * seq)
            starts = np.empty(steps)
            starts[0] = self._step_start
            starts[1:] = ends[:-1]
            self.on_steps(self.version + 1, starts, ends, np.diff(tokens, prepend=self._tokens_at_step))
            self.version += steps
            self._tokens_at_step = int(tokens[-1])
            self._step_start = float(ends[-1])
        self._chain = None
        self.kernel = None
        if doing == "mb":
            self.taken = self.pool.take(mb)
        else:   # between micro-batches the optimizer step runs without the activation blocks
            self._release_blocks()
        if not materialize:
            return
        if doing == "mb":
            work, then = self.predictor.lora_step_s(mb, seq), self._done
        else:
            work, then = self.predictor.lora_optimizer_s(), self._stepped
        self.kernel = compute.resume("lora", work, began, then)

    def _idle(self) -> None:
        """This finetuner waits (for sequences, memory or a plan): the others' chains end, so that the
        tasks they complete wake it as they would one by one."""
        self.pool.settle_chains(self.env.now)

    def close(self, now: float) -> None:
        """End of the run: count what a chain did by ``now``."""
        self.settle(now, materialize=False)
