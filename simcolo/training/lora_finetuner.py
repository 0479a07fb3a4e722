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
"""
from __future__ import annotations

from collections import deque

from simcolo.hardware.environment import At
from simcolo.metrics.training_summary import TrainerReport
from simcolo.policies.base import FinetuneState
from simcolo.training.data import TrainTask


class SequencePool:
    """The finetune jobs' sequences, FIFO, shared by every finetuner."""

    def __init__(self):
        self.items: deque[list] = deque()   # [task, sequences left to hand out, sequences unfinished]
        self.available = 0
        self.waiters: list = []

    def add(self, task: TrainTask) -> None:
        self.items.append([task, task.micro_batch, task.micro_batch])
        self.available += task.micro_batch
        for w in self.waiters:
            w.wake()

    def counters(self) -> dict:
        return {"train_queued_sequences": self.available}

    def take(self, n: int) -> list[list]:
        """Hand out up to ``n`` sequences; returns [(item, count)]."""
        out = []
        for item in self.items:
            if n == 0:
                break
            k = min(n, item[1])
            if k:
                item[1] -= k
                n -= k
                out.append((item, k))
        self.available -= sum(k for _, k in out)
        return out

    def put_back(self, taken) -> None:
        for item, k in taken:
            item[1] += k
            self.available += k

    def finish(self, taken, now: float) -> list[TrainTask]:
        done = []
        for item, k in taken:
            item[2] -= k
            if item[2] == 0:
                item[0].finish_s = now
                done.append(item[0])
        while self.items and self.items[0][2] == 0:
            self.items.popleft()
        return done


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
            "decode_waits_on_finetune_blocks": self.inst.waits_on_lent_blocks})


class LoraFinetuner(FinetunerRules):
    def __init__(self, env, instance, gpu, pool: SequencePool, policy, predictor, seq_len: int,
                 global_batch: int, static_memory: bool, on_task_done, on_step):
        self.env, self.inst, self.gpu, self.pool = env, instance, gpu, pool
        self.policy, self.predictor = policy, predictor
        self.seq_len, self.global_batch, self.static_memory = seq_len, global_batch, static_memory
        self.on_task_done, self.on_step = on_task_done, on_step
        self.kernel = None
        self.taken = None
        self.mb = 0
        self.held = 0
        self.micro_batches = 0
        self.version = 0
        self.tokens_done = 0
        self.sequences_done = 0
        self.aborted_microbatches = 0
        # every plan asked of the policy: (time, decode batch, KV tokens, share, micro-batch, predicted
        # co-run decode latency); bounded, for checks and analysis
        self.plans: list[tuple[float, int, int, float | None, int, float]] = []
        self._wake_pending = False
        self._finishing = False   # inside _done: it starts the next micro-batch itself, no wake needed
        self._step_start = env.now        # when the current optimizer step's first micro-batch could start
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
        self._replan(self.kernel is not None and self.taken is not None, self.kernel is None)

    def _try_start(self) -> None:
        if self.kernel is not None or not self.pool.available:
            return
        share, mb, predicted = self.policy.plan_finetune(self.state(), self.predictor, None)
        mb = min(mb, self.pool.available)
        self._log_plan(share, mb, predicted)
        # static memory: the carve-out is already held (reserve_static)
        mb, need = fit_micro_batch(self.predictor, mb, self.seq_len, self.static_memory, self.held,
                                   self.inst.lendable_blocks())
        if mb <= 0:
            return   # woken again at the next decode iteration or when sequences arrive
        if need:
            self.inst.lend(need)
            self.held += need
        self._apply(share)
        self.mb = mb
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
        self._abort()
        self._release_blocks()

    def _abort(self) -> None:
        if self.kernel is not None and self.taken is not None:
            self.gpu.compute.cancel(self.kernel)
            self.pool.put_back(self.taken)
            self.taken = None
            self.kernel = None
            self.aborted_microbatches += 1
