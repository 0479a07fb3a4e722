"""The vLLM batching rules of one serving instance, written once for every backend.

A :class:`BatchScheduler` holds the instance's requests and paged KV blocks and decides each
*iteration*; it knows neither SimPy nor threads nor a clock (times are arguments). A driver asks it for
the next iteration (:meth:`plan_iteration`), runs that iteration however it runs things (the simulator's
timer events and cost tables, the replay's real kernels) and hands back its end time
(:meth:`complete_iteration`). The simulator's driver (``serving.instance.Instance``) adds exact fast
advance; the live driver (``replay.live_instance.LiveInstance``) runs the kernels.

The rules:

* a prefill iteration admits waiting requests FCFS while they fit ``max_num_seqs``, the token budget
  ``max_batched_tokens`` and the free KV blocks minus the watermark; running decodes pause;
* with ``chunked_prefill`` (Sarathi) an iteration is mixed: every running decode first, then prefill
  chunks (of requests already prefilling, then of newly admitted ones) up to the token budget;
* otherwise a decode iteration gives every running request one token; a request that needs a new KV
  block when none is free preempts the most recently admitted running request (recomputation: its KV
  is dropped and it goes back to the front of the queue);
* a co-runner may borrow free KV blocks (:meth:`lend` / :meth:`give_back`); with a ``lender`` that can
  ``reclaim`` them (Harli's unified pool, decode first), the scheduler takes them back before it would
  preempt or refuse a request.

Roles: ``both``, ``prefill`` (disaggregated: hands a request off after its first token) and ``decode``
(admits requests whose KV was transferred).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from simcolo.errors import ConfigError
from simcolo.workload.request import Request

ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class BatchingConfig:
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    block_size: int = 16
    chunked_prefill: bool = False
    watermark: float = 0.01       # fraction of KV blocks kept free when admitting (vLLM default)
    fast_advance: bool = True

    def validate(self, max_context_len: int) -> None:
        for key in ("max_num_seqs", "max_batched_tokens", "block_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"serving.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.watermark < 1:
            raise ConfigError(f"serving.watermark must be in [0, 1), got {self.watermark}")
        if not self.chunked_prefill and self.max_batched_tokens < max_context_len:
            raise ConfigError(
                f"serving.max_batched_tokens={self.max_batched_tokens} is smaller than the model's "
                f"max_context_len={max_context_len}: without chunked prefill a long prompt could never "
                f"be scheduled; raise it or set serving.chunked_prefill=true")


#: One iteration: (solo latency from the cost model, [(request, prefill chunk tokens)], decoding requests)
Plan = tuple  # (float, list[tuple[Request, int]], list[Request])


class BatchScheduler:
    """Requests, KV blocks and the batching rules of one instance (see the module docstring).

    ``cost`` gives solo iteration latencies (``prefill_s``, ``decode_s``, ``mixed_s``); ``on_done(r)``
    is called when a request finishes or is refused, ``on_prefilled(r, self)`` (prefill role) when its
    first token is out and its KV is to be sent; ``itl`` collects inter-token latencies. A driver
    overrides :meth:`batch_changed`, called whenever the next iteration could differ (an arrival, KV
    blocks freed or lent).
    """

    def __init__(self, index: int, role: str, gpus: list[int], cost, cfg: BatchingConfig, num_blocks: int,
                 on_done: Callable[[Request], None], itl,
                 on_prefilled: Callable[[Request, "BatchScheduler"], None] | None = None):
        if role not in ROLES:
            raise ConfigError(f"instance role must be one of {ROLES}, got '{role}'")
        self.index, self.role, self.gpus = index, role, gpus
        self.cost, self.cfg = cost, cfg
        self.bs = cfg.block_size
        self.num_blocks = num_blocks
        self.free_blocks = num_blocks
        self.watermark_blocks = int(cfg.watermark * num_blocks)
        self.on_done, self.itl, self.on_prefilled = on_done, itl, on_prefilled
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []   # admitted, prefill (chunks) still running
        self.running: list[Request] = []      # decode phase, in admission order
        self.kv_total = 0                     # sum of kv_len over ``running``
        self.outstanding = 0                  # tokens of work left (prefill + decode) on this instance
        self.in_transfer = 0                  # prefill role: requests whose KV is still being sent
        self.busy_s = 0.0
        self.iterations = 0
        self.num_preemptions = 0
        self.model_version = 0          # version of the weights it serves (set by training / weight sync)
        self.lender = None              # a co-runner holding borrowed KV blocks (Harli), with reclaim(inst)
        self.lent_blocks = 0
        self.waits_on_lent_blocks = 0   # preemptions / refused admissions while blocks were lent out

    def batch_changed(self) -> None:
        """The next iteration may differ from the one planned (the driver wakes up or cuts a run)."""

    # ------------------------------------------------------------------ intake
    def _work(self, r: Request) -> int:
        """Tokens of work ``r`` still needs from this instance (for least-outstanding routing)."""
        prefill = (r.prompt_tokens + r.generated - r.prefill_done) if r.needs_prefill else 0
        if self.role == "prefill":
            return prefill + (1 if r.needs_prefill else 0)
        return prefill + r.output_tokens - r.generated

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def enqueue(self, r: Request) -> None:
        """A request arrives (or its KV arrives, on a decode instance)."""
        # Its KV at the last decode step (prompt + output - 1 tokens) must fit, or it could only
        # preempt itself forever. (vLLM avoids this by refusing to start unless the KV cache holds
        # max_model_len tokens; serving.num_gpu_blocks_override can undercut that here.)
        if self.blocks_for(r.prompt_tokens + r.output_tokens - 1) > self.num_blocks - self.watermark_blocks:
            self._reject(r, "exceeds_kv_capacity")
            return
        self.waiting.append(r)
        self.outstanding += self._work(r)
        self.batch_changed()

    def release_transferred(self, r: Request) -> None:
        """Prefill role: the request's KV has been copied to a decode instance; free its blocks."""
        self.free_blocks += r.kv_blocks
        r.kv_blocks = 0
        self.in_transfer -= 1
        self.batch_changed()

    # ------------------------------------------------------------------ KV blocks lent to a co-runner
    def lendable_blocks(self) -> int:
        """Free KV blocks a co-runner may borrow now: all but the watermark and one block per running
        sequence (room for the next iteration of a decode run that is cut at its next boundary)."""
        return max(0, self.free_blocks - self.watermark_blocks - len(self.running) - len(self.prefilling))

    def lend(self, n: int) -> None:
        if not 0 <= n <= self.lendable_blocks():
            raise ValueError(f"instance {self.index}: cannot lend {n} KV blocks ({self.lendable_blocks()} lendable)")
        self.free_blocks -= n
        self.lent_blocks += n
        self._blocks_lent()

    def _blocks_lent(self) -> None:
        """Fewer free blocks than planned with (the simulator's decode run may have to be cut)."""

    def give_back(self, n: int) -> None:
        if not 0 <= n <= self.lent_blocks:
            raise ValueError(f"instance {self.index}: {n} KV blocks given back, {self.lent_blocks} lent")
        self.free_blocks += n
        self.lent_blocks -= n
        if self.waiting:
            self.batch_changed()

    def _reclaim(self) -> None:
        """Decode has priority: take back every lent block (the borrower gives them back at once)."""
        if self.lent_blocks and self.lender is not None:
            self.lender.reclaim(self)

    # ------------------------------------------------------------------ planning one iteration
    def admission_blocked(self) -> bool:
        """True if the head of the queue cannot be admitted now (a pure check, changes nothing).
        It asks :meth:`_admissible` of the head, the same rule :meth:`_admit` applies."""
        if not self.waiting:
            return True
        if len(self.running) + len(self.prefilling) >= self.cfg.max_num_seqs:
            return True
        r = self.waiting[0]
        if r.needs_prefill and self.cfg.chunked_prefill:
            budget = self.cfg.max_batched_tokens - len(self.running)
        else:
            budget = self.cfg.max_batched_tokens
        need = self._admissible(r, budget)
        if need is None:
            return True
        reclaimable = self.lent_blocks if self.lender is not None else 0
        return self.free_blocks + reclaimable - need[0] < self.watermark_blocks

    def _admissible(self, r: Request, budget: int) -> tuple[int, int] | None:
        """(KV blocks, prefill chunk) to admit ``r`` under a token ``budget``; None if the budget is short.
        A request whose KV was transferred (decode role) needs its blocks and no chunk."""
        if not r.needs_prefill:
            return self.blocks_for(r.kv_len), 0
        target = r.prompt_tokens + r.generated
        chunk = min(target, budget) if self.cfg.chunked_prefill else target
        if chunk <= 0 or chunk > budget:
            return None
        return self.blocks_for(target), chunk

    def _admit(self, budget: int, now: float) -> list[tuple[Request, int]]:
        """Admit waiting requests FCFS; returns the (request, prefill chunk) pairs to run now."""
        chunks: list[tuple[Request, int]] = []
        seqs = len(self.running) + len(self.prefilling)
        waiting = self.waiting
        while waiting and seqs < self.cfg.max_num_seqs:
            r = waiting[0]
            admit = self._admissible(r, budget)
            if admit is None:
                break
            need, chunk = admit
            if self.free_blocks - need < self.watermark_blocks:
                if self.lent_blocks:
                    self._reclaim()
                if self.free_blocks - need < self.watermark_blocks:
                    if self.lent_blocks:
                        self.waits_on_lent_blocks += 1
                    break
            waiting.popleft()
            self.free_blocks -= need
            r.kv_blocks = need
            seqs += 1
            if r.scheduled_s is None:
                r.scheduled_s = now
                r.model_version = self.model_version
            if r.needs_prefill:
                r.prefill_done = 0
                self.prefilling.append(r)
                chunks.append((r, chunk))
                budget -= chunk
            else:
                self.running.append(r)
                self.kv_total += r.kv_len
        return chunks

    def _allocate_decode_slots(self) -> None:
        """Give every running request room for one more token, preempting from the back if needed."""
        running, bs = self.running, self.bs
        i = 0
        while i < len(running):
            r = running[i]
            if r.kv_len + 1 > r.kv_blocks * bs:
                if self.free_blocks == 0 and self.lent_blocks:
                    self._reclaim()
                while self.free_blocks == 0:
                    victim = running[-1]
                    self._preempt(victim)
                    if victim is r:
                        break
                else:
                    self.free_blocks -= 1
                    r.kv_blocks += 1
                    i += 1
                    continue
                break  # r itself was preempted (it was last)
            i += 1

    def _preempt(self, r: Request) -> None:
        if self.lent_blocks:
            self.waits_on_lent_blocks += 1
        self.running.remove(r)
        self.kv_total -= r.kv_len
        self.free_blocks += r.kv_blocks
        self.outstanding -= self._work(r)
        r.kv_blocks = 0
        r.kv_len = 0
        r.needs_prefill = True
        r.prefill_done = 0
        r.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(r)
        self.outstanding += self._work(r)

    def plan_iteration(self, now: float) -> Plan | None:
        """Decide the next iteration (admitting, allocating and preempting as it goes). Returns
        (solo latency s, prefill chunks, decoding requests), or None if there is nothing to run."""
        cfg = self.cfg
        if cfg.chunked_prefill:
            self._allocate_decode_slots()
            decodes = list(self.running)
            budget = cfg.max_batched_tokens - len(decodes)
            chunks = []
            for r in self.prefilling:
                left = r.prompt_tokens + r.generated - r.prefill_done
                chunk = min(left, budget)
                if chunk <= 0:
                    break
                chunks.append((r, chunk))
                budget -= chunk
            if budget > 0:
                chunks += self._admit(budget, now)
            if not chunks and not decodes:
                # a decode-role instance may have just admitted transferred requests (no chunk): decode them
                if not self.running:
                    return None
                self._allocate_decode_slots()
                decodes = list(self.running)
                if not decodes:
                    return None
            tokens = sum(c for _, c in chunks)
            latency = self.cost.mixed_s(tokens, len(chunks), len(decodes), self.kv_total)
            return latency, chunks, decodes
        chunks = self._admit(cfg.max_batched_tokens, now)
        if chunks:
            return self.cost.prefill_s(sum(c for _, c in chunks), len(chunks)), chunks, []
        if self.role == "prefill":
            return None
        self._allocate_decode_slots()
        if not self.running:
            return None
        return self.cost.decode_s(len(self.running), self.kv_total), [], list(self.running)

    # ------------------------------------------------------------------ completing one iteration
    def complete_iteration(self, plan: Plan, end: float) -> None:
        """The iteration ``plan`` ended at ``end``: tokens out, prefills done, finished requests retired."""
        _, chunks, decodes = plan
        itl = self.itl
        if decodes:
            finished = False
            for r in decodes:
                r.kv_len += 1
                r.generated += 1
                itl.add(end - r.last_token_s)
                r.last_token_s = end
                if r.generated == r.output_tokens:
                    finished = True
            n = len(decodes)
            self.kv_total += n
            self.outstanding -= n
            if finished:
                self._retire_finished(end)
        for r, chunk in chunks:
            r.prefill_done += chunk
            self.outstanding -= chunk
            if r.prefill_done == r.prompt_tokens + r.generated:
                self._prefill_complete(r, end)

    def _prefill_complete(self, r: Request, end: float) -> None:
        self.prefilling.remove(r)
        r.kv_len = r.prompt_tokens + r.generated
        r.generated += 1
        r.needs_prefill = False
        r.prefill_done = 0
        self.outstanding -= 1
        if r.first_token_s is None:
            r.first_token_s = end
        else:
            self.itl.add(end - r.last_token_s)
        r.last_token_s = end
        if r.generated == r.output_tokens:
            self._finish(r, end)
        elif self.role == "prefill":
            self.in_transfer += 1
            self.on_prefilled(r, self)
        else:
            self.running.append(r)
            self.kv_total += r.kv_len

    def _retire_finished(self, end: float) -> None:
        keep = []
        for r in self.running:
            if r.generated == r.output_tokens:
                self.kv_total -= r.kv_len
                self._finish(r, end)
            else:
                keep.append(r)
        self.running = keep

    def _finish(self, r: Request, end: float) -> None:
        self.free_blocks += r.kv_blocks
        r.kv_blocks = 0
        r.finish_s = end
        r.status = "finished"
        r.instance = self.index
        self.on_done(r)

    def _reject(self, r: Request, reason: str) -> None:
        r.status = reason
        r.instance = self.index
        self.on_done(r)

    # ------------------------------------------------------------------ runs of decode iterations
    def decode_iterations_before_change(self) -> int:
        """Decode iterations the running batch can take before the first completion or block shortage
        (the length of a run the simulator's driver may advance as one event).

        A request with ``kv_len`` K holding ceil(K/bs) blocks needs floor((k + (K-1) mod bs) / bs) new
        blocks over the next k iterations; the batch runs short at the smallest k where the sum over
        requests exceeds the free blocks, i.e. k* = q*bs + bs - r_(m) with q, m = divmod(free, B) and
        r_(m) the (m+1)-th largest residue. Iterations 0..k*-2 need no preemption.
        """
        running, bs = self.running, self.bs
        n_fin = min([r.output_tokens - r.generated for r in running])
        q, m = divmod(self.free_blocks, len(running))
        if q * bs >= n_fin:  # k* > q*bs: enough free blocks whatever the residues
            return n_fin
        residues = sorted([(r.kv_len - 1) % bs for r in running], reverse=True)
        n_safe = q * bs + bs - residues[m] - 1
        return n_fin if n_fin <= n_safe else n_safe

    def run_fits_free_blocks(self, iterations: int) -> bool:
        """True if ``iterations`` decode iterations of the running batch surely fit the free blocks
        (each sequence needs at most ceil(iterations / block_size) new blocks)."""
        return self.free_blocks >= len(self.running) * -(-iterations // self.bs)

    def complete_decode_run(self, ends, c: int) -> None:
        """``c`` decode iterations of the running batch ended at ``ends[:c]`` (a numpy array): the same
        bookkeeping as ``c`` calls of :meth:`complete_iteration`, done at once."""
        running = self.running
        end = ends.item(c - 1)
        first = ends.item(0)
        itl = self.itl
        itl.extend([first - r.last_token_s for r in running])
        if c > 1:
            itl.add_many(ends[1:c] - ends[:c - 1], len(running))
        bs = self.bs
        grown = 0
        finished = False
        for r in running:
            r.last_token_s = end
            g = r.generated = r.generated + c
            kv = r.kv_len = r.kv_len + c
            blocks = -(-kv // bs)
            grown += blocks - r.kv_blocks
            r.kv_blocks = blocks
            if g == r.output_tokens:
                finished = True
        self.free_blocks -= grown
        B = len(running)
        self.kv_total += B * c
        self.outstanding -= B * c
        self.iterations += c
        if self.free_blocks < 0:  # cannot happen if the run was block-safe; never hide it
            raise RuntimeError(f"instance {self.index}: KV blocks over capacity ({self.free_blocks} free)")
        if finished:
            self._retire_finished(end)

    def blocks_grown(self, iterations: int) -> int:
        """New KV blocks the running batch takes over its next ``iterations`` decode iterations."""
        bs = self.bs
        return sum((iterations + (r.kv_len - 1) % bs) // bs for r in self.running)

    # ------------------------------------------------------------------ views
    def outstanding_tokens(self, now: float) -> int:
        """Tokens of work left on this instance (a driver that runs several iterations as one event
        counts those done by ``now``)."""
        return self.outstanding

    def kv_blocks_used(self, now: float) -> int:
        return self.num_blocks - self.free_blocks

    def queue_blocked(self) -> bool:
        """True if requests are queued and the head cannot be admitted now (sequence limit, token
        budget or KV blocks): a new request would wait for running ones to finish."""
        return bool(self.waiting) and self.admission_blocked()

    def sequences(self) -> int:
        """Sequences on the instance: decoding, prefilling or queued."""
        return len(self.running) + len(self.prefilling) + len(self.waiting)
