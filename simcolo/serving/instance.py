"""An inference instance: iteration-level continuous batching over a paged KV cache.

One instance is one model replica on ``tp`` GPUs. Each *iteration* (a SimPy event) runs either

* a prefill batch (vLLM-style scheduling: waiting requests are admitted FCFS while they fit the
  sequence limit, the token budget and the free KV blocks; running decodes pause), or
* with ``chunked_prefill``: a mixed batch (Sarathi): every running decode first, then prefill chunks
  of admitted requests up to the token budget, or
* a decode step of every running request, giving each one new token.

A decode step that lacks a KV block for some sequence preempts the most recently admitted running
request (recomputation: its KV is dropped and it goes back to the front of the queue).

Fast advance. Between events that change the batch (an arrival, a completion, a preemption), decode
iterations are deterministic, so the instance advances them together: it computes every iteration's
latency with one vectorised cost-model call and their end times with ``numpy.cumsum`` (the same
left-to-right sum an iteration-by-iteration run performs), waits for the first completion or block
shortage in one event, and cuts the run short at the next iteration boundary when a request
arrives. Results equal the iteration-by-iteration mode bit for bit; a test compares the two.

Roles: ``both`` (prefill and decode), ``prefill`` (disaggregated prefill: hands requests off after
their first token) and ``decode`` (disaggregated decode: admits requests whose KV was transferred).

Co-location (inert unless attached): an instance tells its GPUs' shared compute what it runs
(``prefill``, ``decode``, idle) and takes the rate they give back (``set_rate``): an iteration takes its
solo latency / rate, and a rate change re-times the iteration in progress and cuts a decode run after
it. A co-runner may borrow free KV blocks (``lend`` / ``give_back``); with a ``lender`` that can
``reclaim`` them, decode takes them back before it would preempt or refuse a request.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from simcolo.errors import ConfigError
from simcolo.hardware.environment import At, SimEnvironment
from simcolo.workload.request import Request

_IDLE, _WAKING, _BUSY, _HORIZON = 0, 1, 2, 3
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


class Instance:
    def __init__(self, env: SimEnvironment, index: int, role: str, gpus: list[int], cost, cfg: BatchingConfig,
                 num_blocks: int, on_done: Callable[[Request], None], itl,
                 on_prefilled: Callable[[Request, "Instance"], None] | None = None):
        if role not in ROLES:
            raise ConfigError(f"instance role must be one of {ROLES}, got '{role}'")
        self.env, self.index, self.role, self.gpus = env, index, role, gpus
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
        self._fast = cfg.fast_advance
        self._state = _IDLE
        self._started = 0.0      # start of the iteration (or decode run) in flight
        self._plan = None        # the single iteration in flight
        self._cut = False        # the decode run in flight was already cut at its next boundary
        self._gen = 0            # generation of the live decode-run timer; older ones are stale
        self._h_ends: np.ndarray | None = None
        self._h_n = 0
        self._end = 0.0          # end of the single iteration in flight
        # --- co-location (all inert in a serving-only run) ---
        self.rate = 1.0          # progress rate on its GPUs (1: solo); iterations take solo latency / rate
        self._gpu_rates: dict[int, float] = {}
        self._computes: list = []       # the GPUs' SharedCompute, told what this instance runs
        self._kind: str | None = None   # what it runs now: "prefill", "decode" or None (idle)
        self.on_iteration: Callable[["Instance", str], None] | None = None  # called as an iteration starts
        self.max_horizon: int | None = None   # cap on decode iterations advanced as one event
        self.model_version = 0          # version of the weights it serves (set by training / weight sync)
        self.lender = None              # a co-runner holding borrowed KV blocks (Harli), with reclaim(inst)
        self.lent_blocks = 0
        self.waits_on_lent_blocks = 0   # preemptions / refused admissions while blocks were lent out

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
        self._notify()

    def release_transferred(self, r: Request) -> None:
        """Prefill role: the request's KV has been copied to a decode instance; free its blocks."""
        self.free_blocks += r.kv_blocks
        r.kv_blocks = 0
        self.in_transfer -= 1
        self._notify()

    def _notify(self) -> None:
        state = self._state
        if state == _IDLE:
            self._state = _WAKING
            At(self.env, self.env.now).callbacks.append(self._boundary)
        elif state == _HORIZON and not self._cut:
            # The batch changes at the next iteration boundary: cut the decode run there. Iterations
            # ending before now are done; the one in progress (or ending exactly now) completes.
            self._cut = True
            c = int(self._h_ends.searchsorted(self.env.now)) + 1
            if c < self._h_n:
                self._h_n = c
                self._arm_timer(self._h_ends.item(c - 1))

    # ------------------------------------------------------------------ the iteration loop
    # Each iteration boundary is one timer event whose callback completes what ran and starts what
    # runs next. (A generator process would cost a resume plus a wake-up event per boundary, and
    # this is the simulator's hot path.)
    def _boundary(self, _event=None) -> None:
        now = self.env.now
        state = self._state
        if state == _BUSY:
            self.busy_s += now - self._started
            self.iterations += 1
            self._complete_iteration(self._plan, now)
        elif state == _HORIZON:
            self._advance_running(self._h_ends, self._h_n, self._started)
        self._state = _WAKING   # planning: a rate change now only sets the rate
        self._started = now
        if self._fast and self.running and not self.prefilling and self._admission_blocked():
            n = self._safe_decode_iterations()
            if self.max_horizon is not None and n > self.max_horizon:
                n = self.max_horizon
            if n > 0:
                if self._computes or self.on_iteration is not None:
                    self._begin("decode")
                self._start_horizon(n, now)
                return
        plan = self._plan_iteration()
        if plan is None:
            self._state = _IDLE
            if self._kind is not None:
                self._begin(None)
            return
        if self._computes or self.on_iteration is not None:
            self._begin("prefill" if plan[1] else "decode")
        self._state = _BUSY
        self._plan = plan
        rate = self.rate
        self._end = now + (plan[0] if rate == 1.0 else plan[0] / rate)
        self._arm_timer(self._end)

    # ------------------------------------------------------------------ co-location
    def attach(self, computes: list) -> None:
        """Run on these GPUs' shared compute: tell them what runs, take the rate they give."""
        self._computes = list(computes)

    @property
    def attached(self) -> bool:
        """True if it runs on shared compute (its GPUs' busy clocks then count its iterations)."""
        return bool(self._computes)

    def _begin(self, kind: str | None) -> None:
        if kind != self._kind:
            self._kind = kind
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
            self._h_n = c + 1
            self._cut = True
            self._arm_timer(ends.item(c))

    def lendable_blocks(self) -> int:
        """Free KV blocks a co-runner may borrow now: all but the watermark and one block per running
        sequence (room for the next iteration of a decode run that is cut at its next boundary)."""
        return max(0, self.free_blocks - self.watermark_blocks - len(self.running) - len(self.prefilling))

    def lend(self, n: int) -> None:
        if not 0 <= n <= self.lendable_blocks():
            raise ValueError(f"instance {self.index}: cannot lend {n} KV blocks ({self.lendable_blocks()} lendable)")
        self.free_blocks -= n
        self.lent_blocks += n
        if self._state == _HORIZON and not self._cut:
            # The decode run's block-safe length assumed the old free count: cut it unless the whole
            # run still fits (its growth is charged to free_blocks only when it ends; each sequence
            # needs at most ceil(iterations / block_size) new blocks).
            if self.free_blocks < len(self.running) * -(-self._h_n // self.bs):
                self._notify()

    def give_back(self, n: int) -> None:
        if not 0 <= n <= self.lent_blocks:
            raise ValueError(f"instance {self.index}: {n} KV blocks given back, {self.lent_blocks} lent")
        self.free_blocks += n
        self.lent_blocks -= n
        if self.waiting:
            self._notify()

    def _reclaim(self) -> None:
        """Decode has priority: take back every lent block (the borrower gives them back at once)."""
        if self.lent_blocks and self.lender is not None:
            self.lender.reclaim(self)

    # ------------------------------------------------------------------ planning one iteration
    def _admission_blocked(self) -> bool:
        """True if the head of the queue cannot be admitted now (a pure check, changes nothing)."""
        if not self.waiting:
            return True
        if len(self.running) + len(self.prefilling) >= self.cfg.max_num_seqs:
            return True
        r = self.waiting[0]
        if r.needs_prefill:
            target = r.prompt_tokens + r.generated
            if self.cfg.chunked_prefill:
                if self.cfg.max_batched_tokens - len(self.running) <= 0:
                    return True
            elif target > self.cfg.max_batched_tokens:
                return True
            need = self.blocks_for(target)
        else:
            need = self.blocks_for(r.kv_len)
        reclaimable = self.lent_blocks if self.lender is not None else 0
        return self.free_blocks + reclaimable - need < self.watermark_blocks

    def _admit(self, budget: int) -> list[tuple[Request, int]]:
        """Admit waiting requests FCFS; returns the (request, prefill chunk) pairs to run now."""
        chunks: list[tuple[Request, int]] = []
        seqs = len(self.running) + len(self.prefilling)
        chunked = self.cfg.chunked_prefill
        waiting = self.waiting
        while waiting and seqs < self.cfg.max_num_seqs:
            r = waiting[0]
            if r.needs_prefill:
                target = r.prompt_tokens + r.generated
                chunk = min(target, budget) if chunked else target
                if chunk <= 0 or chunk > budget:
                    break
                need = self.blocks_for(target)
            else:
                need = self.blocks_for(r.kv_len)
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
                r.scheduled_s = self.env.now
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

    def _plan_iteration(self):
        """Decide the next iteration. Returns (latency_s, prefill chunks, decoding requests) or None."""
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
                chunks += self._admit(budget)
            if not chunks and not decodes:
                return None
            tokens = sum(c for _, c in chunks)
            latency = self.cost.mixed_s(tokens, len(chunks), len(decodes), self.kv_total)
            return latency, chunks, decodes
        chunks = self._admit(cfg.max_batched_tokens)
        if chunks:
            return self.cost.prefill_s(sum(c for _, c in chunks), len(chunks)), chunks, []
        if self.role == "prefill":
            return None
        self._allocate_decode_slots()
        if not self.running:
            return None
        return self.cost.decode_s(len(self.running), self.kv_total), [], list(self.running)

    # ------------------------------------------------------------------ completing one iteration
    def _complete_iteration(self, plan, end: float) -> None:
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

    # ------------------------------------------------------------------ fast advance
    def _safe_decode_iterations(self) -> int:
        """Decode iterations the running batch can take before the first completion or block shortage.

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

    def _start_horizon(self, n: int, start: float) -> None:
        """Run ``n`` decode iterations of the current batch as one event (cut short by ``_notify``)."""
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

    def _advance_running(self, ends: np.ndarray, c: int, start: float) -> None:
        """Apply ``c`` decode iterations ending at ``ends[:c]`` to every running request."""
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
        self.busy_s += end - start
        self.iterations += c
        if self.free_blocks < 0:  # cannot happen if _safe_decode_iterations is right; never hide it
            raise RuntimeError(f"instance {self.index}: KV blocks over capacity ({self.free_blocks} free)")
        if finished:
            self._retire_finished(end)

    # ------------------------------------------------------------------ views (pure queries)
    def _iterations_done(self, now: float) -> int:
        if self._state != _HORIZON:
            return 0
        done = int(self._h_ends.searchsorted(now))
        return done if done < self._h_n else self._h_n

    def queue_blocked(self) -> bool:
        """True if requests are queued and the head cannot be admitted now (sequence limit, token
        budget or KV blocks): a new request would wait for running ones to finish."""
        return bool(self.waiting) and self._admission_blocked()

    def outstanding_tokens(self, now: float) -> int:
        """Tokens of work left on this instance at ``now`` (decode iterations in flight included)."""
        if self._state != _HORIZON:
            return self.outstanding
        done = int(self._h_ends.searchsorted(now))
        return self.outstanding - len(self.running) * (done if done < self._h_n else self._h_n)

    def kv_blocks_used(self, now: float) -> int:
        done = self._iterations_done(now)
        used = self.num_blocks - self.free_blocks
        if done:
            bs = self.bs
            used += sum((done + (r.kv_len - 1) % bs) // bs for r in self.running)
        return used
