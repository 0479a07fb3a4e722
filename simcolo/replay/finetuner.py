"""Live LoRA finetuning on a decode instance (Harli, static_share, flexllm): the replay's twin of
``training.lora_finetuner.LoraFinetuner``.

One :class:`LiveFinetuner` per decode instance, each a thread. It follows the simulator's rules through
the same shared code (``SequencePool``, ``FinetuneState`` via ``finetune_state``, ``fit_micro_batch``) and
the same policy object; what is live is the work: real forward + backward passes of a
``LoraTrainingRunner`` (adapters on the very model the instance serves, which serving never sees) on
micro-batches of random token sequences (seeded by task id), and a real AdamW step of the adapters every
``global_batch`` micro-batches.

The cycle of a micro-batch:

1. *plan* (under the replay's lock): the policy's ``plan_finetune(state, predictor, None)`` gives (knob,
   micro-batch, predicted decode latency); the micro-batch shrinks to the sequences queued and to the
   memory (the KV blocks the instance can lend, or the static carve-out a ``static_memory`` policy
   reserved at construction); the blocks are lent, the sequences taken from the pool, the knob applied;
2. *compute* (outside the lock): forward and backward (``torch.autograd.grad`` over the adapter
   parameters); a checkpoint before each layer's forward and each layer's backward (hooks on the adapted
   twin's blocks and LM head, so serving's forwards never pass them, installed for the computation only
   by ``engine.sm_partition.paced``) paces the thread (``engine.sm_partition.TimeShare``) and notices an
   abort;
3. *done* (under the lock): blocks given back, sequences finished (``pool.finish``; ``on_task_done`` for
   finished tasks); only then is the micro-batch's gradient added to the adapters' ``.grad`` (an aborted
   micro-batch leaves no partial gradient); every ``global_batch`` completed micro-batches the optimizer
   step runs and ``on_step(version, start_s, end_s, tokens)`` is called under the lock.

Decode priority (dynamic memory, Harli and flexllm): the finetuner is the instance's ``lender``. When
decode needs blocks the scheduler calls :meth:`LiveFinetuner.reclaim` under the lock: every block is given
back at once and the micro-batch in flight is aborted there and then -- its sequences go back to the pool
and ``aborted_microbatches`` counts it -- so decode never waits on finetuning. The computation itself
stops at its next layer checkpoint (abort granularity: one layer's forward or backward, or the LM head;
on CUDA the kernels already queued still run). The KV blocks are the scheduler's accounting: the live
engine's KV cache is allocated up front, so giving blocks back moves no memory.

The knob is re-planned as each serving iteration starts (``on_iteration``, set on the instance here, as
``LoraFinetuner`` does); a plan of micro-batch 0 aborts the micro-batch in flight. How the knob is
applied:

* ``sharing="partition"`` (harli, static_share; the knob is decode's SM share, None for none): on CUDA
  the micro-batch runs on a green-context stream holding ``1 - share`` of the SMs (the serving instance
  keeps its own stream, on the whole GPU); the stream is chosen as a micro-batch starts, so a new share
  takes effect at the next micro-batch. Without green contexts it runs on a plain stream and
  ``sharing_method`` says why. On the CPU the time gate keeps the thread busy at most ``1 - share`` of the
  time while serving runs an iteration, re-read at every layer (``engine/sm_partition.py`` says what that
  analogue models and what not).
* ``sharing="time_slice"`` (flexllm; the knob is the finetune's fraction ``f`` of the time): the two
  interleave in time, never overlapping: the gate holds the finetune at its next layer while the instance
  runs an iteration, and after each iteration the serving thread pauses for the slice the policy budgeted
  (the tables' solo latency of that iteration times ``f / (1 - f)``) while the finetune has work
  (``after_iteration``), so an iteration and its slice take what the simulator's stretched iteration does
  when the tables hold; the finetune runs freely while the instance is
  idle. On CUDA each checkpoint synchronizes the finetune's stream, so a hold stops the device work too.

Measured beside the simulator's counters: ``plans`` (as ``LoraFinetuner``'s), ``train_busy_s`` (wall time
with a micro-batch or optimizer step in flight, gate pauses included: a partitioned kernel is running),
``solo_s`` = [measured, predicted] seconds of completed micro-batches that ran alone (predicted:
``predictor.lora_step_s``): with a partition, those during which the instance stayed idle (a partitioned
micro-batch beside an iteration runs slowed, not alone); with time slicing, every one, its wall time less
the time the gate held it (the two sides never overlap, so what is left is the micro-batch alone --
under flexllm the instance is idle too rarely for the first rule to measure anything representative).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch

from simcolo.engine.sm_partition import Cancelled, GreenPartition, TimeShare, green_context_status, paced
from simcolo.training.lora_finetuner import FinetunerRules, SequencePool, fit_micro_batch



@dataclass
class _MicroBatch:
    size: int
    taken: list                       # what ``pool.take`` handed out
    seeds: list[tuple[int, int]]      # (task id, sequences) for the token ids
    start_s: float
    alone: bool                       # the instance was idle when it started
    iterations_before: int
    held_before: float                # the gate's held time so far (time slicing: excluded from solo_s)
    stream: object = None             # CUDA: the stream it ran on


class LiveFinetuner(FinetunerRules):
    """LoRA finetuning on decode instance ``instance`` (module docstring). ``on_task_done(task)`` and
    ``on_step(version, start_s, end_s, tokens)`` are called under the replay's lock."""

    def __init__(self, index: int, instance, device: torch.device, gpu: int, live, pool: SequencePool, policy,
                 predictor, runner, seq_len: int, global_batch: int, static_blocks: int | None, vocab_size: int,
                 on_task_done, on_step):
        self.index, self.inst, self.device, self.gpu, self.live = index, instance, device, gpu, live
        self.pool, self.policy, self.predictor, self.runner = pool, policy, predictor, runner
        self.seq_len, self.global_batch, self.vocab_size = seq_len, global_batch, vocab_size
        self.static_memory = static_blocks is not None
        self.sharing = policy.sharing
        self.on_task_done, self.on_step = on_task_done, on_step
        self.taken = None          # sequences of the micro-batch in flight (None: none, or it was aborted)
        self.mb = 0
        self.held = 0
        self.knob: float | None = None
        self.micro_batches = 0
        self.version = 0
        self.tokens_done = 0
        self.sequences_done = 0
        self.aborted_microbatches = 0
        self.chained_microbatches = 0   # the simulator advances idle micro-batches in closed form; live runs each
        self.train_busy_s = 0.0
        self.solo_s = [0.0, 0.0]
        #: (time, decode batch, KV tokens, knob, micro-batch, predicted co-run decode latency)
        self.plans: list[tuple[float, int, int, float | None, int, float]] = []
        self._phase: str | None = None        # "microbatch" | "optimizer" | None
        self._wake_pending = True             # try to start when the thread starts
        self._abort_requested = False
        self._step_start = 0.0
        self._tokens_at_step = 0
        self._partitions: dict[float, GreenPartition] = {}
        self._cond = live.condition()
        self._serving_paused = False   # time slicing: serving is pausing for the finetune's slice
        self.gate = TimeShare(lambda: instance.running_kind is not None and not self._serving_paused)
        self._gate_on = device.type != "cuda" or self.sharing == "time_slice"
        self._green_why: str | None = None
        self.sharing_method = self._sharing_method()
        with live.lock:
            instance.on_iteration = self.on_iteration
            instance.on_iteration_end = self.on_iteration_end
            instance.after_iteration = self.after_iteration
            instance.training_beside = lambda: self.busy
            if self.static_memory:   # the static-share carve-out, for good
                instance.lend(static_blocks)
                self.held = static_blocks
            else:
                instance.lender = self
            pool.waiters.append(self)
        self.thread = threading.Thread(target=self._main, name=f"finetuner-{index}", daemon=True)

    def _sharing_method(self) -> str:
        if self.sharing == "time_slice":
            return "time_slice" + (" (stream synchronized at each layer)" if self.device.type == "cuda" else "")
        if self.device.type != "cuda":
            return "cpu_time_share"
        self._green_why = green_context_status(self.device)
        if self._green_why is None:
            return "green_context"
        return f"streams (green contexts unavailable: {self._green_why})"

    # ------------------------------------------------------------------ what the backend reads
    @property
    def busy(self) -> bool:
        """A micro-batch or an optimizer step is in flight."""
        return self._phase is not None

    def busy_by_gpu(self) -> dict[int, float]:
        """Finetune kernel seconds per cluster GPU (its decode instance's one), counted as each
        micro-batch or optimizer step ends."""
        return {self.gpu: self.train_busy_s}

    @property
    def now(self) -> float:
        return self.live.now

    # ------------------------------------------------------------------ events (under the lock)
    def wake(self) -> None:
        """Sequences arrived in the pool (``SequencePool.add``), or the instance's state changed."""
        self._wake_pending = True
        self._cond.notify()

    def on_iteration(self, inst, kind: str) -> None:
        """A serving iteration starts: re-plan the knob for the micro-batch in flight (a plan of 0 aborts
        it), or let an idle finetuner try to start one."""
        self._replan(self.taken is not None, self._phase is None)

    def on_iteration_end(self, inst, kind: str, start_s: float, end_s: float) -> None:
        """A serving iteration ended (partition mode: nothing to do; time slicing pauses serving after it)."""

    def after_iteration(self, inst, predicted_s: float) -> None:
        """Outside the lock, in the serving thread, after an iteration whose solo latency the tables put at
        ``predicted_s``. Time slicing (FlexLLM-style token interleaving, no overlap): while the finetune has
        work, serving pauses for the finetune's slice, ``predicted_s * f / (1 - f)`` -- the finetune tokens
        the policy budgeted for this iteration, as time -- and the finetune runs alone meanwhile; during the
        iterations themselves the gate holds it. An iteration and its slice take ``d + predicted_s * f /
        (1 - f)``: the simulator's stretched iteration, ``predicted_s / (1 - f)``, when the tables hold."""
        f = self.gate.time_slice
        if self.sharing != "time_slice" or f is None or not (self.busy or self.pool.available):
            return
        self._serving_paused = True
        try:
            time.sleep(predicted_s * f / (1.0 - f))
        finally:
            self._serving_paused = False

    def reclaim(self, inst) -> None:
        """Decode needs the blocks: abort the micro-batch in flight and give every block back now."""
        if self._abort():
            self._wake_pending = True   # re-plan as soon as the computation has stopped
        self._release_blocks()

    def _abort(self) -> bool:
        if self.taken is None:
            return False
        self.pool.put_back(self.taken)
        self.taken = None
        self.aborted_microbatches += 1
        self._abort_requested = True
        self.gate.interrupt()
        return True

    def _release_blocks(self) -> None:
        if not self.static_memory and self.held:
            self.inst.give_back(self.held)
            self.held = 0

    def _apply(self, knob: float | None) -> None:
        self.knob = knob
        if self.sharing == "time_slice":
            self.gate.set_time_slice(knob)
        else:
            self.gate.set_share(knob)   # the CPU's gate; on CUDA the stream is chosen per micro-batch

    def _try_start(self) -> _MicroBatch | None:
        if self._phase is not None or not self.pool.available:
            return None
        state = self.state()
        knob, mb, predicted = self.policy.plan_finetune(state, self.predictor, None)
        mb = min(mb, self.pool.available)
        self._log_plan(knob, mb, predicted)
        mb, need = fit_micro_batch(self.predictor, mb, self.seq_len, self.static_memory, self.held,
                                   state.lendable_blocks)
        if mb <= 0:
            return None   # woken again at the next serving iteration or when sequences arrive
        if need:
            self.inst.lend(need)
            self.held += need
        self._apply(knob)
        self.mb = mb
        self.taken = self.pool.take(mb)
        self._abort_requested = False
        self._phase = "microbatch"
        return _MicroBatch(mb, self.taken, [(task.id, k) for task, k in self.taken], self.live.now,
                           self.inst.running_kind is None, self.inst.iterations, self.gate.paused_s)

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self.thread.start()

    def stop_and_join(self, timeout: float | None = None) -> None:
        with self._cond:
            self._cond.notify_all()
        self.gate.interrupt()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def close(self) -> None:
        """Nothing to release (the backend calls ``close`` on every trainer)."""

    def _main(self) -> None:
        self.live.run_guarded(f"finetuner {self.index}", self.device, self._train)

    def _train(self) -> None:
        live = self.live
        with self._cond:
            self._step_start = live.now
        while True:
            with self._cond:
                job = None
                while not live.stopped:
                    if self._wake_pending:
                        self._wake_pending = False
                        job = self._try_start()
                        if job is not None:
                            break
                    self._cond.wait()
                if live.stopped:
                    return
            grads = self._compute(job)
            with self._cond:
                if live.stopped:
                    return
                committed, step_due = self._done(job, grads is not None)
            if committed:
                self._accumulate(job, grads)
            if step_due:
                self._optimizer_step(job)

    def _stream_ctx(self, job: _MicroBatch):
        """CUDA partition: the green-context stream with ``1 - share`` of the SMs (``job.stream``)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if job.stream is None:
            job.stream = torch.cuda.current_stream(self.device)
            share = self.knob
            if self.sharing == "partition" and share is not None and self._green_why is None:
                part = self._partitions.get(share)
                if part is None:
                    part = self._partitions[share] = GreenPartition(self.device, share)
                job.stream = part.streams[1]
        return torch.cuda.stream(job.stream)

    def _token_ids(self, job: _MicroBatch) -> torch.Tensor:
        rows = []
        for task_id, k in job.seeds:
            gen = torch.Generator().manual_seed(task_id % 2**63)
            rows.append(torch.randint(self.vocab_size, (k, self.seq_len), generator=gen))
        return torch.cat(rows).to(self.device)

    def _compute(self, job: _MicroBatch) -> tuple | None:
        """Forward + backward of the micro-batch; its adapter gradients, or None if it was aborted.

        Between two layers (forward or backward) a checkpoint (``paced``) stops an aborted micro-batch and,
        where the gate is on, paces the thread (on CUDA after synchronizing the stream: device time)."""
        runner = self.runner
        with self._stream_ctx(job):
            ids = self._token_ids(job)
            gate = self.gate if self._gate_on else None
            sync = job.stream.synchronize if self.device.type == "cuda" and gate is not None else None
            try:
                with paced(runner.adapted, gate, cancelled=self._cancelled, before=sync):
                    loss = runner.forward(ids)
                    grads = torch.autograd.grad(loss, runner.adapter_params)
                    self.live.synchronize(self.device)
            except Cancelled:
                return None
        return grads

    def _cancelled(self) -> bool:
        return self._abort_requested or self.live.stopped

    def _done(self, job: _MicroBatch, completed: bool) -> tuple[bool, bool]:
        """Under the lock, the computation over: (commit its gradient, optimizer step due)."""
        live = self.live
        end = live.now
        self.train_busy_s += end - job.start_s
        self._phase = None
        if self.taken is not job.taken:
            return False, False   # aborted under the lock: already put back and counted
        if not completed:   # cannot happen (a checkpoint raises only after an abort), but never lose sequences
            self._abort()
            self._release_blocks()
            return False, False
        self._release_blocks()
        self.micro_batches += 1
        self.sequences_done += job.size
        self.tokens_done += job.size * self.seq_len
        inst = self.inst
        if self.sharing == "time_slice":
            alone_s = end - job.start_s - (self.gate.paused_s - job.held_before)
        elif job.alone and inst.running_kind is None and inst.iterations == job.iterations_before:
            alone_s = end - job.start_s
        else:
            alone_s = None
        if alone_s is not None:
            self.solo_s[0] += alone_s
            self.solo_s[1] += self.predictor.lora_step_s(job.size, self.seq_len)
        self.taken = None
        for task in self.pool.finish(job.taken, end):
            self.on_task_done(task)   # may add tasks to the pool (and wake the finetuners)
        self._wake_pending = True
        step_due = self.micro_batches % self.global_batch == 0
        if step_due:
            self._phase = "optimizer"
        return True, step_due

    def _accumulate(self, job: _MicroBatch, grads) -> None:
        with self._stream_ctx(job), torch.no_grad():
            for p, g in zip(self.runner.adapter_params, grads):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            self.live.synchronize(self.device)

    def _optimizer_step(self, job: _MicroBatch) -> None:
        live = self.live
        start = live.now
        with self._stream_ctx(job):
            self.runner.optimizer_step()
            live.synchronize(self.device)
        with self._cond:
            end = live.now
            self.train_busy_s += end - start
            self._phase = None
            self.version += 1
            self.on_step(self.version, self._step_start, end, self.tokens_done - self._tokens_at_step)
            self._tokens_at_step = self.tokens_done
            self._step_start = end

    def warm_up(self, iterations: int, micro_batch: int, seq_len: int) -> None:
        """First calls pay one-off costs (allocator, kernel selection): forward + backward of random
        micro-batches, gradients discarded (the adapters and their optimizer are left as they were)."""
        gen = torch.Generator().manual_seed(0)
        runner = self.runner
        for _ in range(iterations):
            ids = torch.randint(self.vocab_size, (micro_batch, seq_len), generator=gen).to(self.device)
            torch.autograd.grad(runner.forward(ids), runner.adapter_params)
        self.live.synchronize(self.device)
