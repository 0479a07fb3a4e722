"""The live driver of a serving instance: real prefill and decode kernels, scheduled by the shared rules.

``LiveInstance`` *is* a :class:`~simcolo.serving.batch_scheduler.BatchScheduler` (admission, token budget,
KV blocks with watermark, preemption by recomputation, token accounting, model versions), the same
class the simulator's driver is built on: only the clock and the iteration's end differ. Each instance
has a thread that plans an iteration under the replay's lock, runs its kernels outside it on the real
model (``engine.runner.ServingRunner``: continuous batching over a KV cache of ragged sequences; chunks
continue a cached prefix; a prefill instance copies a finished prefill's KV out for the decode instance,
which imports it), and completes the iteration at the wall-clock time the kernels finished. So the
simulator and the replay make the same scheduling decisions for the same state; what differs is only
how long things take, which is what the comparison measures.

Token ids: a request's prompt is random tokens seeded by its id (content does not change latency);
each output token is the greedy next token of the real model.
"""
from __future__ import annotations

import threading

import torch

from simcolo.serving.batch_scheduler import BatchScheduler


class LiveInstance(BatchScheduler):
    def __init__(self, index, role, gpus, cost, cfg, num_blocks, on_done, itl, on_prefilled=None, *,
                 live, device: torch.device):
        super().__init__(index, role, gpus, cost, cfg, num_blocks, on_done, itl, on_prefilled)
        self.live, self.device = live, device
        self.runner = None                   # a ServingRunner, set before start()
        self.vocab_size = 0
        self._cond = live.condition()
        self._tokens: dict[int, list[int]] = {}   # request id -> output token ids so far
        #: one row per iteration: (instance, prefill seqs, prefill tokens, decode seqs, KV tokens, start_s,
        #: end_s, predicted_s, training_beside) -- predicted_s is the cost model's solo latency for that very
        #: batch, so the tables' error can be read off the replay itself, free of the machine's drift
        self.iteration_log: list[tuple] = []
        self.training_beside = lambda: False   # a co-located trainer is running a kernel (set by the backend)
        self.running_kind: str | None = None   # what its kernels run now: "prefill", "decode" or None
        #: called under the lock as an iteration starts, with (instance, kind), and as it ends, with
        #: (instance, kind, start_s, end_s): a finetuner on a decode instance re-plans and paces itself there
        self.on_iteration = None
        self.on_iteration_end = None
        #: called outside the lock after each iteration, in this thread (a time-sliced finetune's slice runs
        #: there: the next iteration starts when it is spent)
        self.after_iteration = None
        #: prefill/decode disaggregation: KV caches (k, v, tokens so far) copied out after a prefill (outbox,
        #: by request id, until the backend sends them) and received from a prefill instance (inbox)
        self.outbox: dict[int, tuple] = {}
        self.inbox: dict[int, tuple] = {}
        self.thread = threading.Thread(target=self._main, name=f"serving-{index}", daemon=True)

    def start(self, runner, vocab_size: int) -> None:
        self.runner, self.vocab_size = runner, vocab_size
        self.thread.start()

    def batch_changed(self) -> None:
        """Called under the lock whenever the batch may change (an arrival, blocks given back)."""
        self._cond.notify()

    # ------------------------------------------------------------------ the iteration loop
    def _main(self) -> None:
        self.live.run_guarded(f"serving instance {self.index}", self.device, self._serve)

    def _serve(self) -> None:
        live = self.live
        while True:
            with self._cond:
                plan = None
                while not live.stopped:
                    plan = self.plan_iteration(live.now)
                    if plan is not None:
                        break
                    self.running_kind = None
                    self._cond.wait()
                if live.stopped:
                    return
                predicted, chunks, decodes = plan
                kind = self.running_kind = "prefill" if chunks else "decode"
                if self.on_iteration is not None:
                    self.on_iteration(self, kind)
                shape = (len(chunks), sum(c for _, c in chunks), len(decodes), self.kv_total if decodes else 0)
                beside = self.training_beside()
                start = live.now
                active = {r.id for r in self.running}
                active.update(r.id for r in self.prefilling)
                for r, _ in chunks:   # KV that arrived for a request preempted before it ever decoded here
                    if r.id in self.inbox:
                        self._tokens[r.id] = self.inbox.pop(r.id)[2]
                # (key, the chunk's token ids, its offset in the prompt, True if it completes the prompt)
                prompts = [(r.id, *self._chunk_ids(r, c)) for r, c in chunks]
                decode_ids = [r.id for r in decodes]
                arrived = [(r.id, self.inbox.pop(r.id)) for r in decodes if r.id in self.inbox]
            self._run_kernels(active, prompts, decode_ids, arrived)
            with self._cond:
                end = live.now
                self.busy_s += end - start
                self.iterations += 1
                self.iteration_log.append((self.index, *shape, start, end, predicted,
                                           beside or self.training_beside()))
                self.complete_iteration(plan, end)
                if self.on_iteration_end is not None:
                    self.on_iteration_end(self, kind, start, end)
            if self.after_iteration is not None:
                self.after_iteration(self, predicted)

    def _run_kernels(self, active: set[int], prompts: list, decode_ids: list[int], arrived: list) -> None:
        runner = self.runner
        tokens = self._tokens
        for key in [k for k in runner.keys() if k not in active]:   # finished, preempted or handed off
            runner.release(key)
        for key in [k for k in self.outbox if k not in active]:    # finished at its prefill: not sent
            del self.outbox[key]
        for key, (k, v, generated) in arrived:     # KV moved here from a prefill instance
            runner.import_sequence(key, k, v)
            tokens[key] = generated
        for key, _, offset, _ in prompts:
            if offset == 0 and key in runner.keys():   # preempted and re-admitted in one plan: recompute
                runner.release(key)
        prefill_out = decode_out = ()
        if decode_ids:
            last = torch.tensor([tokens[k][-1] for k in decode_ids], dtype=torch.long, device=self.device)
            items = [(key, ids) for key, ids, _, _ in prompts]
            prefill_out, decode_out = runner.mixed(items, decode_ids, last)
        elif prompts:
            prefill_out = runner.prefill([(key, ids) for key, ids, _, _ in prompts])
        for (key, _, _, completes), t in zip(prompts, prefill_out.tolist() if len(prefill_out) else []):
            if completes:
                tokens.setdefault(key, []).append(t)
                if self.role == "prefill":      # its KV leaves this instance: copy it out before release
                    self.outbox[key] = (*runner.export(key), list(tokens[key]))
        for key, t in zip(decode_ids, decode_out.tolist() if len(decode_out) else []):
            tokens[key].append(t)
        for key in [k for k in tokens if k not in active]:
            del tokens[key]

    def _chunk_ids(self, r, chunk: int) -> tuple[torch.Tensor, int, bool]:
        """The next ``chunk`` prompt tokens of ``r`` (chunked prefill continues where the last chunk ended),
        their offset, and whether they complete the prompt (then the first token comes out)."""
        offset = r.prefill_done
        target = r.prompt_tokens + r.generated
        ids = self._prompt_ids(r)
        return ids[offset:offset + chunk], offset, offset + chunk == target

    def _prompt_ids(self, r) -> torch.Tensor:
        """The prompt (random, seeded by the request id) plus the tokens generated before a preemption
        (recomputation re-prefills ``prompt + generated`` tokens; ids the replay no longer holds are
        drawn like the prompt's)."""
        gen = torch.Generator().manual_seed(r.id)
        ids = torch.randint(self.vocab_size, (r.prompt_tokens + r.generated,), generator=gen)
        done = self._tokens.get(r.id, [])[:r.generated]
        if done:
            ids[r.prompt_tokens:r.prompt_tokens + len(done)] = torch.tensor(done, dtype=torch.long)
        return ids.to(self.device)

    def stop_and_join(self, timeout: float | None = None) -> None:
        with self._cond:
            self._cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
