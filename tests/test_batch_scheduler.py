"""Unit tests of the vLLM batching rules of one serving instance (``BatchScheduler``), on hand-built
cases: requests built by hand, a tiny deterministic cost object, and the scheduler driven as a driver
drives it (``plan = s.plan_iteration(now)``, then ``s.complete_iteration(plan, end)``). No Hydra, no
trace, no SimPy. Expected numbers are worked out by hand in the comments (``bs``: tokens per KV block).
"""
import copy
import random

import numpy as np
import pytest

from simcolo.metrics.itl import ITLHistogram
from simcolo.serving.batch_scheduler import BatchingConfig, BatchScheduler
from simcolo.workload.request import Request


# ---------------------------------------------------------------------------------------- helpers
class FakeCost:
    """Deterministic iteration latencies: 1 ms per prefill token, 10 ms per decode iteration."""

    def prefill_s(self, tokens, seqs):
        return 0.001 * tokens

    def decode_s(self, batch, kv):
        return 0.01

    def mixed_s(self, tokens, prefill_seqs, decode_seqs, kv):
        return 0.01 + 0.001 * tokens


class Lender:
    """A co-runner holding borrowed KV blocks that gives every one back when asked (Harli)."""

    def __init__(self):
        self.calls = 0

    def reclaim(self, inst):
        self.calls += 1
        inst.give_back(inst.lent_blocks)


def make(num_blocks=100, role="both", block_size=16, watermark=0.0, **cfg):
    """A scheduler and the list its ``on_done`` (and ``on_prefilled``) calls land in."""
    done, prefilled = [], []
    s = BatchScheduler(0, role, [0], FakeCost(), BatchingConfig(block_size=block_size, watermark=watermark, **cfg),
                       num_blocks, done.append, ITLHistogram(),
                       on_prefilled=lambda r, inst: prefilled.append((r, inst)))
    s.prefilled = prefilled  # the test's own handle on the on_prefilled calls
    return s, done


def req(i, prompt, output, arrival=0.0):
    return Request(i, arrival, prompt, output)


def transferred(i, prompt, output, generated=1):
    """A request as a decode instance receives it: prefilled elsewhere, ``generated`` tokens out, KV of
    prompt + generated - 1 tokens."""
    r = Request(i, 0.0, prompt, output)
    r.generated, r.kv_len, r.needs_prefill = generated, prompt + generated - 1, False
    return r


def step(s, now):
    """One iteration as a driver runs it; returns (plan, end) (plan None: nothing to run)."""
    plan = s.plan_iteration(now)
    if plan is None:
        return None, now
    end = now + plan[0]
    s.complete_iteration(plan, end)
    return plan, end


def ids(rs):
    return [r.id for r in rs]


def chunk_ids(plan):
    return [(r.id, c) for r, c in plan[1]]


def check_invariants(s):
    """KV blocks are conserved; kv_total and outstanding agree with the requests."""
    held = sum(r.kv_blocks for r in s.running + s.prefilling)
    assert s.free_blocks >= 0
    assert s.free_blocks + held + s.lent_blocks == s.num_blocks  # both role: nothing in transfer
    assert s.kv_total == sum(r.kv_len for r in s.running)
    work = 0
    for r in list(s.waiting) + s.prefilling + s.running:
        if r.needs_prefill:
            work += r.prompt_tokens + r.generated - r.prefill_done
        work += r.output_tokens - r.generated
    assert s.outstanding == work


# ---------------------------------------------------------------------------------------- 1. admission limits
def test_max_num_seqs_caps_admitted_sequences():
    s, _ = make(max_num_seqs=2)
    a, b, c = req(0, 10, 5), req(1, 10, 5), req(2, 10, 5)
    for r in (a, b, c):
        s.enqueue(r)
    plan = s.plan_iteration(0.0)
    # two sequences admitted: 10 + 10 prompt tokens, 1 ms each
    assert chunk_ids(plan) == [(0, 10), (1, 10)] and plan[2] == []
    assert plan[0] == pytest.approx(0.020)
    s.complete_iteration(plan, 0.020)
    assert ids(s.running) == [0, 1] and ids(s.waiting) == [2]
    # the third waits while two run: the next iteration is a decode of the two
    plan = s.plan_iteration(0.020)
    assert plan[1] == [] and ids(plan[2]) == [0, 1] and ids(s.waiting) == [2]
    assert s.admission_blocked()


def test_token_budget_caps_prefill_batch_and_head_of_line_blocks():
    s, _ = make(max_batched_tokens=100)
    for r in (req(0, 60, 5), req(1, 50, 5), req(2, 20, 5)):
        s.enqueue(r)
    plan = s.plan_iteration(0.0)
    # 60 fits; 60 + 50 = 110 > 100 stops admission; the 20-token request behind it would fit (80) but
    # admission is FCFS: it waits behind the head
    assert chunk_ids(plan) == [(0, 60)]
    assert ids(s.waiting) == [1, 2]
    s.complete_iteration(plan, 0.060)
    # next iteration: 50 + 20 = 70 <= 100, a prefill iteration (the running decode pauses)
    plan = s.plan_iteration(0.060)
    assert chunk_ids(plan) == [(1, 50), (2, 20)] and plan[2] == []
    assert plan[0] == pytest.approx(0.070)


def test_head_blocked_on_kv_blocks_blocks_smaller_requests_behind_it():
    s, _ = make(num_blocks=10)
    s.enqueue(req(0, 100, 10))            # ceil(100/16) = 7 blocks; final KV 109 tokens = 7 blocks <= 10
    step(s, 0.0)
    assert s.free_blocks == 3
    big, small = req(1, 64, 2), req(2, 10, 2)   # 4 blocks (> 3 free) and 1 block (would fit)
    s.enqueue(big)
    s.enqueue(small)
    assert s.admission_blocked()
    plan = s.plan_iteration(0.1)
    assert plan[1] == [] and ids(plan[2]) == [0]          # a decode of request 0, nobody admitted
    assert ids(s.waiting) == [1, 2] and s.free_blocks == 3


# ---------------------------------------------------------------------------------------- 2. watermark
@pytest.mark.parametrize("prompt, admitted", [
    (800, True),    # 50 blocks: 60 free - 50 = 10 = the watermark, admitted
    (801, False),   # 51 blocks: 60 - 51 = 9 < 10, waits
    (816, False),   # 51 blocks as well
])
def test_watermark_keeps_ten_percent_of_blocks_free(prompt, admitted):
    s, _ = make(num_blocks=100, watermark=0.1)
    assert s.watermark_blocks == 10
    s.enqueue(req(0, 630, 100))           # 40 blocks, 631 tokens after a decode still fit them
    step(s, 0.0)                          # (final KV 729 tokens = 46 blocks <= 90)
    assert s.free_blocks == 60
    r = req(1, prompt, 1)
    s.enqueue(r)
    assert s.admission_blocked() is (not admitted)
    plan = s.plan_iteration(1.0)
    if admitted:
        assert chunk_ids(plan) == [(1, prompt)] and s.free_blocks == 10
    else:
        assert plan[1] == [] and ids(plan[2]) == [0] and ids(s.waiting) == [1] and s.free_blocks == 60


# ---------------------------------------------------------------------------------------- 3. preemption
def test_decode_block_shortage_preempts_most_recent_then_itself_and_readmission_recomputes():
    # bs = 4, 3 blocks, three 4-token prompts admitted together (A, B, C in admission order), 1 block each
    s, done = make(num_blocks=3, block_size=4)
    a, b, c = req(0, 4, 2), req(1, 4, 8), req(2, 4, 8)   # final KV of B, C: 4 + 8 - 1 = 11 tokens = 3 blocks
    for r in (a, b, c):
        s.enqueue(r)
    plan, end = step(s, 0.0)
    assert chunk_ids(plan) == [(0, 4), (1, 4), (2, 4)] and end == pytest.approx(0.012)
    assert s.free_blocks == 0 and [r.kv_len for r in (a, b, c)] == [4, 4, 4]
    d = req(3, 4, 2)
    s.enqueue(d)                          # waits: no free block
    plan = s.plan_iteration(end)
    # A's 5th token needs a 2nd block, none free: C (most recently admitted) is preempted and A takes its
    # block; B then needs one, none free, and B is now last running: B preempts itself (its block frees)
    assert plan[1] == [] and ids(plan[2]) == [0]
    assert ids(s.running) == [0] and a.kv_blocks == 2 and s.free_blocks == 1
    assert ids(s.waiting) == [1, 2, 3]    # the victims go to the FRONT of the queue, B before C
    for r in (b, c):
        assert (r.kv_len, r.kv_blocks, r.needs_prefill, r.prefill_done, r.preemptions) == (0, 0, True, 0, 1)
        assert r.generated == 1           # the generated token is kept (recomputed, not regenerated)
    assert s.num_preemptions == 2
    check_invariants(s)
    s.complete_iteration(plan, end + 0.01)            # A's 2nd token: A finishes, 1 + 2 = 3 blocks free
    assert done == [a] and s.free_blocks == 3
    # B is re-admitted first, recomputing prompt + generated = 4 + 1 = 5 tokens (2 blocks, 1 left);
    # C needs 2 as well: it waits, and D behind it
    plan, _ = step(s, end + 0.01)
    assert chunk_ids(plan) == [(1, 5)] and plan[0] == pytest.approx(0.005)
    assert (b.kv_len, b.generated, b.kv_blocks, b.needs_prefill) == (5, 2, 2, False)
    assert ids(s.waiting) == [2, 3] and s.free_blocks == 1
    assert b.first_token_s == pytest.approx(0.012)    # the first token is not re-stamped
    check_invariants(s)


# ---------------------------------------------------------------------------------------- 4. chunked prefill
def test_chunked_prefill_budget_order_and_first_token_after_last_chunk():
    s, _ = make(chunked_prefill=True, max_batched_tokens=64)
    r1 = req(1, 150, 3)
    s.enqueue(r1)
    # iteration 1: a 64-token chunk of r1 (it holds ceil(150/16) = 10 blocks from admission on)
    plan, t = step(s, 0.0)
    assert chunk_ids(plan) == [(1, 64)] and plan[0] == pytest.approx(0.01 + 0.064)
    assert r1.kv_blocks == 10 and r1.first_token_s is None and r1.generated == 0
    # iteration 2: 64 more (128 of 150)
    plan, t = step(s, t)
    assert chunk_ids(plan) == [(1, 64)] and r1.prefill_done == 128 and r1.first_token_s is None
    # iteration 3: r1's last 22 tokens, then new admissions fill the budget: r2 whole (30), r3 a
    # 12-token first chunk; 22 + 30 + 12 = 64
    r2, r3 = req(2, 30, 5), req(3, 20, 5)
    s.enqueue(r2)
    s.enqueue(r3)
    plan = s.plan_iteration(t)
    assert chunk_ids(plan) == [(1, 22), (2, 30), (3, 12)] and plan[2] == []
    t3 = t + plan[0]
    s.complete_iteration(plan, t3)
    assert r1.first_token_s == t3 and (r1.kv_len, r1.generated) == (150, 1)
    assert r2.first_token_s == t3 and r3.first_token_s is None and r3.prefill_done == 12
    assert ids(s.running) == [1, 2] and ids(s.prefilling) == [3]
    # iteration 4: the two decodes first (1 token each), then r3's last 8 tokens: 2 + 8 <= 64
    plan = s.plan_iteration(t3)
    assert ids(plan[2]) == [1, 2] and chunk_ids(plan) == [(3, 8)]
    assert plan[0] == pytest.approx(0.01 + 0.008)
    check_invariants(s)


def test_chunked_prefill_never_exceeds_the_token_budget():
    # decodes take 1 token each out of the budget before any chunk: budget 10, 3 decodes -> 7 for chunks
    s, _ = make(chunked_prefill=True, max_batched_tokens=10)
    for i in range(3):
        s.enqueue(req(i, 3, 20))
    plan, t = step(s, 0.0)
    assert chunk_ids(plan) == [(0, 3), (1, 3), (2, 3)]          # 9 <= 10, then budget 1 for nobody
    long = req(3, 20, 2)
    s.enqueue(long)
    sizes = []
    while long.first_token_s is None:
        plan = s.plan_iteration(t)
        assert len(plan[2]) + sum(c for _, c in plan[1]) <= 10
        sizes.append(dict(chunk_ids(plan)).get(3))
        t += plan[0]
        s.complete_iteration(plan, t)
    # 20 prompt tokens at 10 - 3 = 7 per iteration: 7, 7, 6
    assert sizes == [7, 7, 6]


# ---------------------------------------------------------------------------------------- 5. lending
def test_lendable_blocks_and_lend_limit():
    s, _ = make(num_blocks=100, watermark=0.1, chunked_prefill=True, max_batched_tokens=64)
    s.enqueue(req(0, 32, 10))   # 2 blocks, prefilled in one 32-token chunk
    s.enqueue(req(1, 200, 10))  # 13 blocks, a 32-token first chunk: still prefilling
    step(s, 0.0)
    assert len(s.running) == 1 and len(s.prefilling) == 1 and s.free_blocks == 85
    # 85 free - 10 watermark - 1 running - 1 prefilling = 73
    assert s.lendable_blocks() == 73
    with pytest.raises(ValueError):
        s.lend(74)
    with pytest.raises(ValueError):
        s.lend(-1)
    s.lend(73)
    assert (s.free_blocks, s.lent_blocks, s.lendable_blocks()) == (12, 73, 0)
    with pytest.raises(ValueError):
        s.give_back(74)
    s.give_back(73)
    assert (s.free_blocks, s.lent_blocks) == (85, 0)


@pytest.mark.parametrize("with_lender, prompt, admitted, reclaims, waits", [
    (True, 320, True, 1, 0),    # 20 blocks > 10 free: reclaim the 90 lent, then admit (80 free left)
    (True, 160, True, 0, 0),    # 10 blocks fit the 10 free: no reclaim
    (False, 320, False, 0, 1),  # static carve-out: nothing to reclaim, refused while blocks are lent
])
def test_admission_reclaims_lent_blocks_before_refusing(with_lender, prompt, admitted, reclaims, waits):
    s, _ = make(num_blocks=100)
    lender = Lender()
    if with_lender:
        s.lender = lender
    s.lend(90)
    assert s.free_blocks == 10
    r = req(0, prompt, 2)
    s.enqueue(r)
    assert s.admission_blocked() is (not admitted)
    plan = s.plan_iteration(0.0)
    assert lender.calls == reclaims and s.waits_on_lent_blocks == waits
    if admitted:
        assert chunk_ids(plan) == [(0, prompt)]
        assert s.free_blocks + s.lent_blocks + r.kv_blocks == 100
    else:
        assert plan is None and ids(s.waiting) == [0] and s.lent_blocks == 90


@pytest.mark.parametrize("with_lender", [True, False])
def test_decode_shortage_reclaims_before_preempting(with_lender):
    # bs = 4, 10 blocks; A and B: 8-token prompts (2 full blocks each), 10 tokens out (final KV 17 = 5 blocks)
    s, _ = make(num_blocks=10, block_size=4)
    lender = Lender()
    if with_lender:
        s.lender = lender
    a, b = req(0, 8, 10), req(1, 8, 10)
    s.enqueue(a)
    s.enqueue(b)
    _, t = step(s, 0.0)
    assert s.free_blocks == 6 and s.lendable_blocks() == 4   # 6 - 0 watermark - 2 running
    s.lend(4)
    # decode 1 (kv 8 -> 9) takes one block each: 2 - 2 = 0 free; decodes 2..4 (kv 9 -> 12) need none
    for _ in range(4):
        plan, t = step(s, t)
        assert ids(plan[2]) == [0, 1]
    assert s.free_blocks == 0 and (a.kv_len, a.kv_blocks) == (12, 3)
    # decode 5: kv 12 -> 13 needs a 4th block each, none free
    plan = s.plan_iteration(t)
    if with_lender:   # the 4 lent blocks come back: both decode, 4 - 2 = 2 free
        assert lender.calls == 1 and s.lent_blocks == 0
        assert ids(plan[2]) == [0, 1] and s.free_blocks == 2 and s.num_preemptions == 0
    else:             # B (last admitted) is preempted: its 3 blocks free, A takes 1
        assert ids(plan[2]) == [0] and ids(s.waiting) == [1] and s.free_blocks == 2
        assert s.num_preemptions == 1 and s.waits_on_lent_blocks == 1 and s.lent_blocks == 4


# ---------------------------------------------------------------------------------------- random states
def random_state(rng, chunked):
    """A small scheduler driven through a random history: arrivals, iterations, lending."""
    s, done = make(num_blocks=rng.randint(6, 30), block_size=rng.choice([2, 4]),
                   watermark=rng.choice([0.0, 0.1, 0.25]), max_num_seqs=rng.randint(1, 4),
                   max_batched_tokens=rng.randint(8, 40), chunked_prefill=chunked)
    if rng.random() < 0.5:
        s.lender = Lender()
    t = 0.0
    for i in range(rng.randint(1, 8)):
        s.enqueue(req(i, rng.randint(1, 30), rng.randint(1, 12), t))
        for _ in range(rng.randint(0, 3)):
            _, t = step(s, t)
        if rng.random() < 0.3 and s.lendable_blocks():
            s.lend(rng.randint(1, s.lendable_blocks()))
        if rng.random() < 0.2 and s.lent_blocks:
            s.give_back(rng.randint(1, s.lent_blocks))
    return s, t


# ---------------------------------------------------------------------------------------- 6. admission_blocked
@pytest.mark.parametrize("chunked", [False, True])
def test_admission_blocked_agrees_with_plan_iteration(chunked):
    checked = {True: 0, False: 0}
    for seed in range(300):
        rng = random.Random(seed)
        s, t = random_state(rng, chunked)
        for _ in range(10):
            check_invariants(s)
            blocked = s.admission_blocked()
            waiting = list(s.waiting)
            # chunked: the chunks of requests already prefilling and this iteration's new decode blocks
            # come out of the budget / free blocks before admission, and admission_blocked sees neither
            # (see test_chunked_admission_blocked_sees_the_decode_blocks_of_the_same_iteration)
            clean = not chunked or (not s.prefilling and all(r.kv_len < r.kv_blocks * s.bs for r in s.running))
            plan = s.plan_iteration(t)
            admitted = [r for r in waiting if r in s.prefilling or r in s.running]
            if not blocked and clean:
                assert waiting and admitted[:1] == waiting[:1], f"seed {seed}"
                checked[False] += 1
            if blocked:
                assert admitted == [], f"seed {seed}"
                checked[True] += 1
            if plan is None:
                break
            t += plan[0]
            s.complete_iteration(plan, t)
    assert checked[True] > 100 and checked[False] > 100


@pytest.mark.xfail(strict=True, reason="known and harmless: admission_blocked() says the head can be admitted, "
                   "but with chunked_prefill plan_iteration first gives running decodes their new KV blocks "
                   "and the head no longer fits; the simulator's driver only skips a fast-advance run then "
                   "(True => nothing admitted always holds, which is what exactness needs)")
def test_chunked_admission_blocked_sees_the_decode_blocks_of_the_same_iteration():
    # bs = 4, 3 blocks: A (4-token prompt, 1 block) decoding at kv 4, 2 blocks free
    s, _ = make(num_blocks=3, block_size=4, chunked_prefill=True, max_batched_tokens=64)
    a = req(0, 4, 5)
    s.enqueue(a)
    _, t = step(s, 0.0)
    assert (a.kv_len, s.free_blocks) == (4, 2)
    b = req(1, 8, 1)         # needs 2 blocks: 2 - 2 = 0 >= 0 free, so admission_blocked() is False
    s.enqueue(b)
    blocked = s.admission_blocked()
    plan = s.plan_iteration(t)
    # A's 5th token takes a 2nd block first: 1 free < 2, B is not admitted
    assert ids(plan[2]) == [0] and s.free_blocks == 1
    assert blocked == (b not in s.prefilling)


# ---------------------------------------------------------------------------------------- 7. decode runs
def decode_state(rng):
    """A decode instance (non-chunked) with 1-5 transferred requests running and nothing waiting; None
    if the draw does not give one."""
    bs = rng.choice([1, 2, 4, 16])
    rs = []
    for i in range(rng.randint(1, 5)):
        out = rng.randint(2, 30)
        rs.append(transferred(i, rng.randint(1, 40), out, rng.randint(1, out - 1)))
    held = sum(-(-r.kv_len // bs) for r in rs)
    s, done = make(num_blocks=held + rng.randint(0, 2 * len(rs)), role="decode", block_size=bs)
    for r in rs:
        s.enqueue(r)
    _, t = step(s, 0.0)      # admits them all (or not) and runs one decode iteration
    if done or s.waiting or not s.running or s.num_preemptions:
        return None
    return s, t


def clone(s):
    c = copy.deepcopy(s)
    done = []
    c.on_done = done.append
    return c, done


def single_decode_steps(s, done, t, limit=None):
    """Decode iterations one at a time until the first completion or preemption (or ``limit``):
    (iterations completed without preemption, their end times, free blocks after each one's allocation).
    ``done``: the list ``s.on_done`` appends to."""
    ends, free, finished = [], [], len(done)
    while limit is None or len(ends) < limit:
        before = s.num_preemptions
        plan = s.plan_iteration(t)
        assert plan[1] == []
        if s.num_preemptions > before:
            break
        free.append(s.free_blocks)
        t += plan[0]
        s.complete_iteration(plan, t)
        ends.append(t)
        if len(done) > finished:
            break
    return len(ends), ends, free


def test_decode_iterations_before_change_hand_example():
    # the state of test_decode_shortage_reclaims_before_preempting after its 1st decode: bs = 4, A and B
    # at kv 9 holding 3 blocks, 0 free, 2 of 10 tokens out. With q, m = divmod(0 free, 2) = (0, 0) and
    # residues (9 - 1) % 4 = 0: k* = 0*4 + 4 - 0 = 4, so 3 safe iterations (kv 10, 11, 12); 8 tokens
    # before a completion
    s, _ = make(num_blocks=10, block_size=4)
    for i in range(2):
        s.enqueue(req(i, 8, 10))
    _, t = step(s, 0.0)
    s.lend(4)
    _, t = step(s, t)
    assert s.free_blocks == 0 and [r.kv_len for r in s.running] == [9, 9]
    assert s.decode_iterations_before_change() == 3
    assert s.blocks_grown(3) == 0 and s.blocks_grown(4) == 2
    assert s.run_fits_free_blocks(0) and not s.run_fits_free_blocks(1)


def test_decode_iterations_before_change_matches_single_steps():
    states = 0
    for seed in range(600):
        rng = random.Random(seed)
        got = decode_state(rng)
        if got is None:
            continue
        s, t = got
        states += 1
        n = s.decode_iterations_before_change()
        c, c_done = clone(s)
        steps, _, _ = single_decode_steps(c, c_done, t)
        assert n == steps, f"seed {seed}"
        n_fin = min(r.output_tokens - r.generated for r in s.running)
        for k in range(1, n_fin + 1):   # a run that surely fits the free blocks is a safe run
            if s.run_fits_free_blocks(k):
                assert k <= n, f"seed {seed}"
    assert states > 200


def request_state(s, done):
    rs = sorted(s.running + list(s.waiting) + done, key=lambda r: r.id)
    return {
        "requests": [(r.id, r.generated, r.kv_len, r.kv_blocks, r.last_token_s, r.status, r.finish_s) for r in rs],
        "running": ids(s.running), "finished": sorted(ids(done)),
        "free": s.free_blocks, "kv_total": s.kv_total, "outstanding": s.outstanding,
    }


def test_complete_decode_run_equals_single_iterations():
    states = 0
    for seed in range(600):
        rng = random.Random(seed)
        got = decode_state(rng)
        if got is None:
            continue
        s, t = got
        n = s.decode_iterations_before_change()
        if n < 1:
            continue
        states += 1
        c = rng.randint(1, n)
        one, one_done = clone(s)
        free_before = s.free_blocks
        steps, ends, free = single_decode_steps(one, one_done, t, limit=c)
        assert steps == c
        assert s.blocks_grown(c) == free_before - free[-1]   # blocks taken before any completion frees
        run_done = []
        s.on_done = run_done.append
        s.complete_decode_run(np.array(ends), c)
        assert request_state(s, run_done) == request_state(one, one_done), f"seed {seed}"
        s.itl.flush()
        one.itl.flush()
        assert s.itl.total == one.itl.total and s.itl.sum_s == pytest.approx(one.itl.sum_s)
    assert states > 150


# ---------------------------------------------------------------------------------------- 8. roles
def test_prefill_role_hands_off_after_first_token_and_never_decodes():
    s, done = make(role="prefill")
    r, single = req(0, 32, 5), req(1, 16, 1)
    s.enqueue(r)
    s.enqueue(single)
    assert s.outstanding == (32 + 1) + (16 + 1)   # prefill role: prompt + its first token
    plan, end = step(s, 0.0)
    assert chunk_ids(plan) == [(0, 32), (1, 16)] and end == pytest.approx(0.048)
    # r: first token out, KV (2 blocks) kept for the transfer; a 1-token request finishes right here
    assert s.prefilled == [(r, s)] and done == [single] and single.status == "finished"
    assert (r.generated, r.kv_len, r.kv_blocks, r.first_token_s) == (1, 32, 2, end)
    assert s.in_transfer == 1 and s.running == [] and s.free_blocks == 98 and s.outstanding == 0
    assert s.plan_iteration(end) is None    # never decodes
    s.release_transferred(r)
    assert s.free_blocks == 100 and r.kv_blocks == 0 and s.in_transfer == 0


def test_decode_role_admits_transferred_kv_without_prefill():
    s, done = make(role="decode")
    r = transferred(0, 30, 5)               # kv 30 tokens: ceil(30/16) = 2 blocks; 4 tokens left
    s.enqueue(r)
    assert s.outstanding == 4
    plan = s.plan_iteration(0.0)
    assert plan[1] == [] and plan[2] == [r]   # admitted straight into the decode batch
    assert r.kv_blocks == 2 and s.free_blocks == 98   # kv 31 still fits 2 blocks
    t = 0.0 + plan[0]
    s.complete_iteration(plan, t)
    while not done:
        _, t = step(s, t)
    # 4 decode iterations of 10 ms; kv 30 + 4 = 34 tokens = 3 blocks, all freed at the end
    assert done == [r] and r.generated == 5 and r.kv_len == 34 and r.finish_s == pytest.approx(0.04)
    assert s.free_blocks == 100 and s.outstanding == 0 and r.first_token_s is None


def test_chunked_decode_role_plans_a_decode_for_an_admitted_transfer():
    # (a bug found by this test: the plan returned None although the request was running, and the
    # driver went idle until the next arrival)
    s, _ = make(role="decode", chunked_prefill=True, max_batched_tokens=512)
    r = transferred(0, 100, 20)
    s.enqueue(r)
    plan = s.plan_iteration(0.0)
    assert r in s.running
    assert plan is not None     # there is a running request: something to run


# ---------------------------------------------------------------------------------------- 9. enqueue refusal
@pytest.mark.parametrize("output, refused", [(45, False), (46, True)])
def test_enqueue_refuses_a_request_that_can_never_fit(output, refused):
    # 10 blocks of 16, watermark 1 block: 9 usable = 144 tokens; final KV = 100 + output - 1 tokens
    s, done = make(num_blocks=10, watermark=0.1)
    r = req(0, 100, output)
    s.enqueue(r)
    if refused:   # 145 tokens = 10 blocks > 9
        assert r.status == "exceeds_kv_capacity" and done == [r] and r.instance == 0
        assert not s.waiting and s.outstanding == 0
    else:         # 144 tokens = 9 blocks
        assert r.status == "pending" and done == [] and ids(s.waiting) == [0]
