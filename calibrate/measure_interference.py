"""Co-run interference (``interference``): an inference iteration (side a: ``prefill`` or ``decode``)
running beside training work (side b: ``train``, forward + backward of the first pipeline stage of
``num_stages``, or ``lora``, forward + backward of the whole model with LoRA adapters) on one GPU, or,
on the CPU, in two threads of one process.

Each side is a callable that launches (on the CPU: runs) one iteration. A measurement on CUDA:

1. *alone*: each side runs ``n`` iterations on a plain CUDA stream with the GPU to itself; its
   per-iteration latency is timed with CUDA events (``latency_*_alone_s``);
2. *together*: both sides are launched on their own streams, interleaved in the order of their
   planned start times so that both queues stay full for ``duration_s``; each side's per-iteration
   latency is timed on its stream (``latency_*_s``);
3. ``slowdown_x = latency_x_s / latency_x_alone_s``, the median over ``repeats`` such runs.

Methods (column ``method``):

* ``streams``: two ordinary CUDA streams; the hardware shares the SMs as it likes (``sm_share_a`` =
  ``sm_share_b`` = 1: both may use every SM).
* ``green_context``: the SMs are split with CUDA green contexts through the ``cuda-bindings`` package
  (``cuDevSmResourceSplitByCount`` -> ``cuDevResourceGenerateDesc`` -> ``cuGreenCtxCreate`` ->
  ``cuGreenCtxStreamCreate``, wrapped with ``torch.cuda.ExternalStream``): side a gets at least
  ``sm_share_a`` of the SMs (rounded up to the driver's granularity; the share actually obtained is
  recorded), side b the rest. The slowdowns are relative to the *whole-GPU* solo latencies, so they
  include the effect of having fewer SMs.
* ``threads`` (``device=cpu``): each side runs in its own ``threading.Thread`` of this one Python
  process, as the live replay's CPU mode runs a serving instance and a trainer. torch releases the GIL
  inside its ops, so the ops of the two sides overlap on the cores (each op with
  ``torch.get_num_threads()`` intra-op threads, the calibration's ``threads`` setting), while the
  Python between the ops contends for the GIL. No partition: ``sm_share_a`` = ``sm_share_a_actual`` =
  ``sm_share_b`` = 1. To compare with a CPU replay, which sets ``torch.set_num_threads(1)``, calibrate
  with ``threads=1`` (its prefill/decode/training tables then match too): with more intra-op threads
  per side than half the cores the two sides' thread pools oversubscribe the cores and the slowdowns
  become erratic (some below 1).

  *alone*: ``n`` iterations (``n`` such that they last about ``duration_s``, at least 3) back to back
  in a thread by itself (the main thread only waits for it), timed with ``time.perf_counter``. Each of
  the ``repeats`` rounds times a alone, b alone, then both together (about ``3 * duration_s``);
  ``slowdown_x`` is the median over the rounds of the round's together / alone ratio, and the latency
  columns are the medians over the rounds of each latency (so ``slowdown_x`` is close to, not exactly,
  ``latency_x_s / latency_x_alone_s``). On a CPU shared with other work the alone latencies drift by
  tens of percent from one second to the next; a ratio within one round (a tenth of a second) cancels
  that drift, where one alone block measured before all the co-runs would turn it into the slowdown.
  *together*: both threads start at a ``threading.Barrier`` and run iterations back to back; each
  records ``time.perf_counter`` at its start and after every iteration, so its iterations tile its
  running time without gaps (loop overhead and any wait for the GIL between two iterations count to
  the next one, as in the alone loop). A side is *ready* once it has run ``duration_s`` and completed
  ``MIN_ITERATIONS + 2`` iterations; the side that becomes ready second sets a shared stop flag, and
  both stop after their current iteration. The *overlap window* is from the later of the two starts
  to the earlier of the two last iteration ends: both threads run an iteration at every instant of
  it. A side's co-run latency is the mean of its iterations that lie entirely inside the window
  (``CoRun.latency``). Choices, and why:

  - with the shared stop flag neither side stops before both have run ``duration_s``, so the window
    lasts at least ``duration_s`` minus the start skew at the barrier (microseconds to a GIL switch);
    a side that finished its count alone would otherwise run its last iterations by itself and look
    faster;
  - the partial iterations at the window's ends (the first iteration of the side released first at
    the barrier, and the iteration a side finishes after the other stopped) ran partly alone and are
    left out, not prorated: progress within an iteration is not uniform in time, so a prorated
    fraction would be biased; all iterations of one side have the same work, so leaving out the two
    ends picks no faster or slower ones;
  - ``MIN_ITERATIONS + 2`` iterations before a side is ready leave at least ``MIN_ITERATIONS`` whole
    ones inside the window (one may be cut at the start, one at the end).

* ``time_share`` (``device=cpu``, the partition method of a CPU calibration): the CPU's analogue of an
  SM partition, as the live replay applies a partition's share on the CPU (``TimeShare`` in
  ``simcolo/engine/sm_partition.py``, whose docstring says what it models and what not). A ``threads``
  co-run in which side a flags "serving busy" while it runs an iteration and side b runs with the gate's
  checkpoints between its layers (``sm_partition.paced``, forward and backward), the gate set to share
  ``s``: while side a is busy, side b is kept busy at most ``1 - s`` of the time. Rows at each of the
  grid's ``sm_shares``: ``sm_share_a`` = ``sm_share_a_actual`` = ``s``, ``sm_share_b`` = ``1 - s`` (shares
  of time). Measured only for the kind pairs in ``TIME_SHARE_PAIRS`` (decode beside lora: the partition
  policies, harli and static_share, partition a disaggregated decode instance beside LoRA finetuning; a
  share query for another pair of a CPU table is a ``TableError``, "no SM-partition measurements"), to
  keep the CPU calibration short, by the ``threads`` point itself (a point
  with ``time_shares``; ``describe_method`` still lists ``threads``): in the first ``TIME_SHARE_ROUNDS``
  of its rounds, after the unpaced co-run, one paced co-run per share; slowdowns are the median over
  those rounds of the paced co-run latency over the round's (unpaced) solo latency, as ``threads``
  computes them, so ``slowdown_b`` includes the time side b is made to sleep (as a green-context
  slowdown includes the SMs it lacks). A paced co-run lasts longer than an unpaced one (side b needs
  ``MIN_ITERATIONS + 2`` iterations at ``1 - s`` of the time; ~4x at ``s`` = 0.75), hence the fewer rounds.

* MPS active-thread percentages need one process per side and a running MPS daemon; calibrate does
  not drive those, and says so in the metadata.

On a device that is neither CUDA nor the CPU nothing is measured and the metadata says
``interference_method: "unavailable: no CUDA device"``.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from calibrate.context import Context
from calibrate.grids import axis, scalar
from simcolo.errors import ConfigError
from simcolo.engine.sm_partition import GreenPartition, green_context_status, paced, TimeShare

MPS_NOTE = ("MPS not used: active-thread percentages need one process per side and a running MPS "
            "control daemon")
#: ``threads``: whole iterations each side must have inside the overlap window of a co-run.
MIN_ITERATIONS = 2
#: ``time_share`` (CPU): the (kind_a, kind_b) pairs measured with the SM-partition analogue: the partition
#: policies, harli and static_share, partition a (disaggregated) decode instance beside LoRA finetuning.
TIME_SHARE_PAIRS = (("decode", "lora"),)
#: ``time_share``: at most this many of the ``repeats`` rounds co-run paced at every share (a paced co-run
#: lasts several times an unpaced one: side b runs ``1 - share`` of the time).
TIME_SHARE_ROUNDS = 3


# --------------------------------------------------------------------------------- green contexts

def describe_method(device: torch.device) -> tuple[str, str, list[str]]:
    """(``interference_method`` for the metadata, a note with the reasons, methods to measure)."""
    if device.type == "cpu":
        return "threads", threads_note(), ["threads"]
    if device.type != "cuda":
        return "unavailable: no CUDA device", "no CUDA device: co-run interference needs a GPU or the CPU", []
    why = green_context_status(device)
    if why is None:
        return "green_context", f"green contexts via cuda-bindings, plus plain streams; {MPS_NOTE}", \
            ["streams", "green_context"]
    return "streams", f"green contexts unavailable: {why}; {MPS_NOTE}", ["streams"]


def threads_note() -> str:
    """How the ``threads`` method co-runs the sides here (for the metadata's ``interference_notes``)."""
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()), name="interference-probe")
    probe.start()
    probe.join()
    return (f"CPU: side a and side b each in its own Python thread (threading.Thread) of one process, started "
            f"together at a threading.Barrier; torch intra-op threads per side: {seen[0]} "
            f"(torch.get_num_threads() in a worker thread), {os.cpu_count()} CPU cores; torch releases the GIL "
            f"inside its ops, the Python between them contends for the GIL (switch interval "
            f"{sys.getswitchinterval() * 1e3:g} ms); method threads: no partition (shares 1). Co-run latency: mean "
            "of each side's whole iterations inside the window where both threads run "
            "(calibrate/measure_interference.py). "
            "Partition method time_share (the CPU's analogue of an SM partition; "
            f"{', '.join(f'{kb} beside {ka}' for ka, kb in TIME_SHARE_PAIRS)} only): the same co-run with side b "
            "paced between its layers by the live replay's TimeShare gate (simcolo/engine/sm_partition.py), busy "
            "at most 1 - s of the time while side a runs an iteration, at each of the grid's sm_shares s; "
            f"slowdowns over the unpaced solo latencies, in the first {TIME_SHARE_ROUNDS} rounds")


# --------------------------------------------------------------------------------- co-run timing

def _alone(fn: Callable[[], None], stream, n: int) -> float:
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(n):
            fn()
        end.record(stream)
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def _together(fa, sa, na: int, fb, sb, nb: int, ta: float, tb: float) -> tuple[float, float]:
    plan = sorted([(i * ta, 0) for i in range(na)] + [(j * tb, 1) for j in range(nb)])
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(2)]
    streams, fns = (sa, sb), (fa, fb)
    torch.cuda.synchronize()
    for side in (0, 1):
        events[side][0].record(streams[side])
    for _, side in plan:
        with torch.cuda.stream(streams[side]):
            fns[side]()
    for side in (0, 1):
        events[side][1].record(streams[side])
    torch.cuda.synchronize()
    a = events[0][0].elapsed_time(events[0][1]) / 1e3 / na
    b = events[1][0].elapsed_time(events[1][1]) / 1e3 / nb
    return a, b


# ---------------------------------------------------------------------------- co-run timing: threads

class _Worker(threading.Thread):
    """A thread running ``body``; an exception it raises is kept and raised again by :meth:`result`."""

    def __init__(self, body: Callable[[], Any], name: str):
        super().__init__(name=name, daemon=True)
        self.body, self.value, self.error = body, None, None

    def run(self) -> None:
        try:
            self.value = self.body()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _thread_alone(fn: Callable[[], None], n: int) -> float:
    """Per-iteration latency of ``n`` back-to-back calls of ``fn`` in a thread by itself."""
    def body() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    worker = _Worker(body, "interference-alone")
    worker.start()
    return worker.result()


@dataclass(frozen=True)
class CoRun:
    """One ``threads`` co-run: ``bounds[side]`` is ``time.perf_counter`` at the side's start and after
    each of its iterations (so iteration ``i`` spans ``bounds[side][i]`` .. ``bounds[side][i + 1]``);
    side 0 is a, side 1 is b."""

    bounds: tuple[list[float], list[float]]

    @property
    def window(self) -> tuple[float, float]:
        """(start, end) of the time both sides were running an iteration."""
        a, b = self.bounds
        return max(a[0], b[0]), min(a[-1], b[-1])

    def inside(self, side: int) -> tuple[int, int]:
        """Indices ``(i, j)`` into ``bounds[side]``: iterations ``i .. j - 1`` lie entirely in the window."""
        w0, w1 = self.window
        t = self.bounds[side]
        i = next((k for k, x in enumerate(t) if x >= w0), len(t) - 1)
        j = max((k for k, x in enumerate(t) if x <= w1), default=0)
        return i, max(i, j)

    def iterations(self, side: int) -> int:
        i, j = self.inside(side)
        return j - i

    def latency(self, side: int) -> float:
        """Mean latency of ``side``'s iterations inside the window."""
        i, j = self.inside(side)
        if j <= i:
            raise RuntimeError(f"interference co-run: side {'ab'[side]} has no whole iteration inside the "
                               "overlap window")
        t = self.bounds[side]
        return (t[j] - t[i]) / (j - i)


def _threads_row(p: dict[str, Any], alone_a: list[float], alone_b: list[float], runs: list[CoRun]) -> dict[str, Any]:
    """A ``threads`` (or ``time_share``) row: per round the together / alone ratio, medians over the rounds."""
    return {**p, "latency_a_alone_s": statistics.median(alone_a), "latency_b_alone_s": statistics.median(alone_b),
            "latency_a_s": statistics.median(r.latency(0) for r in runs),
            "latency_b_s": statistics.median(r.latency(1) for r in runs),
            "slowdown_a": statistics.median(r.latency(0) / t for r, t in zip(runs, alone_a)),
            "slowdown_b": statistics.median(r.latency(1) / t for r, t in zip(runs, alone_b)),
            "repeats": len(runs)}


def _time_share_together(fa: Callable[[], None], fb: Callable[[], None], model_b: torch.nn.Module, share: float,
                         duration_s: float, min_iterations: int = MIN_ITERATIONS) -> CoRun:
    """Method ``time_share``: :func:`_threads_together` with side a flagging "serving busy" while it runs
    an iteration and side b (whose iterations run ``model_b``) paced between its layers by a
    :class:`TimeShare` gate set to ``share``, as the live replay paces a finetune beside a serving
    instance (module docstring)."""
    busy = [False]

    def side_a() -> None:
        busy[0] = True
        try:
            fa()
        finally:
            busy[0] = False

    gate = TimeShare(lambda: busy[0])
    gate.set_share(share)
    started = [False]

    def side_b() -> None:
        if not started[0]:   # the gate's clock starts with b's first iteration, not at the barrier
            started[0] = True
            gate.begin()
        fb()

    with paced(model_b, gate):
        return _threads_together(side_a, side_b, duration_s, min_iterations)


def _threads_together(fa: Callable[[], None], fb: Callable[[], None], duration_s: float,
                      min_iterations: int = MIN_ITERATIONS) -> CoRun:
    """Run ``fa`` and ``fb`` back to back in two threads started at a barrier until both have run
    ``duration_s`` and ``min_iterations + 2`` iterations (module docstring, method ``threads``)."""
    barrier = threading.Barrier(2)
    stop = threading.Event()
    lock = threading.Lock()
    ready = [False, False]
    bounds: tuple[list[float], list[float]] = ([], [])

    def body(side: int, fn: Callable[[], None]) -> None:
        t = bounds[side]
        try:
            barrier.wait()
            start = time.perf_counter()
            t.append(start)
            waiting = True
            while not stop.is_set():
                fn()
                now = time.perf_counter()
                t.append(now)
                if waiting and now - start >= duration_s and len(t) > min_iterations + 2:
                    waiting = False
                    with lock:
                        ready[side] = True
                        if all(ready):
                            stop.set()
        except BaseException:
            stop.set()          # the other side stops too ...
            barrier.abort()     # ... also if it still waits at the barrier
            raise

    workers = [_Worker(lambda s=s, f=f: body(s, f), f"interference-{'ab'[s]}") for s, f in ((0, fa), (1, fb))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    errors = [w.error for w in workers if w.error is not None]
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    return CoRun(bounds)


# --------------------------------------------------------------------------------- the measurer

class InterferenceMeasurer:
    table = "interference"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.method, self.note, self.methods = describe_method(ctx.device)
        self.shapes = {k: _shapes(grid, where, k) for k in ("prefill", "decode", "train", "lora")}
        self.kinds_b = [k for k in ("train", "lora") if self.shapes[k]]
        self.num_stages = scalar(grid, where, "num_stages")
        self.lora_rank = scalar(grid, where, "lora_rank")
        self.shares = axis(grid, where, "sm_shares", kind=float)
        self.duration_s = scalar(grid, where, "duration_s", float)
        if any(not 0 < s < 1 for s in self.shares):
            raise ConfigError(f"{where}.sm_shares: {self.shares}; each share must be in (0, 1)")
        self.serving_len = max([x // y for x, y in self.shapes["prefill"]]
                               + [y + 1 for _, y in self.shapes["decode"]] + [1])
        self.train_len = max([t for k in self.kinds_b for _, t in self.shapes[k]] + [1])
        self._models: dict[Any, torch.nn.Module] = {}
        self._partitions: dict[float, GreenPartition] = {}
        #: CPU: the shares side a's unpartitioned ``threads`` point also measures with method ``time_share``
        self.time_shares = sorted(set(self.shares)) if "threads" in self.methods else []

    def points(self) -> list[dict[str, Any]]:
        pts = []
        for kind_a in ("prefill", "decode"):
            for a in self.shapes[kind_a]:
                for kind_b in self.kinds_b:
                    for b in self.shapes[kind_b]:
                        base = {"kind_a": kind_a, "a_x": a[0], "a_y": a[1], "kind_b": kind_b,
                                "b_micro_batch": b[0], "b_seq_len": b[1]}
                        for unpartitioned in ("streams", "threads"):
                            if unpartitioned in self.methods:
                                pts.append({**base, "method": unpartitioned, "sm_share_a": 1.0})
                        if "threads" in self.methods and (kind_a, kind_b) in TIME_SHARE_PAIRS and self.time_shares:
                            # the threads point also yields the time_share rows (same solo rounds); the shares
                            # are part of its identity, so a resumed calibration with other shares re-measures it
                            pts[-1]["time_shares"] = list(self.time_shares)
                        if "green_context" in self.methods:
                            pts += [{**base, "method": "green_context", "sm_share_a": s} for s in self.shares]
        return pts

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        from calibrate import memory

        spec, b = self.ctx.spec, self.ctx.dtype_bytes
        if p["kind_a"] == "prefill":
            side_a = memory.prefill_bytes(spec, p["a_x"], p["a_y"], b)
        else:
            side_a = memory.decode_bytes(spec, p["a_x"], p["a_y"], b)
        lora = p["kind_b"] == "lora"
        side_b = memory.training_bytes(spec, spec.num_layers if lora else -(-spec.num_layers // self.num_stages),
                                       True, lora or self.num_stages == 1, p["b_micro_batch"], p["b_seq_len"], b,
                                       trainable_params=0 if lora else None)
        return side_a + side_b

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        if p["method"] == "threads":
            return self._measure_threads(p)
        ctx = self.ctx
        fa, fb = self._side_a(p), self._side_b(p)
        plain_a, plain_b = torch.cuda.Stream(ctx.device), torch.cuda.Stream(ctx.device)
        ta, tb = _alone(fa, plain_a, 3), _alone(fb, plain_b, 3)
        na, nb = max(3, round(self.duration_s / ta)), max(3, round(self.duration_s / tb))
        ta, tb = _alone(fa, plain_a, na), _alone(fb, plain_b, nb)
        if p["method"] == "streams":
            sa, sb, share_a, share_b = plain_a, plain_b, 1.0, 1.0
        else:
            part = self._partition(p["sm_share_a"])
            sa, sb = part.streams
            share_a, share_b = (c / part.total_sms for c in part.sm_counts)
        runs = [_together(fa, sa, na, fb, sb, nb, ta, tb) for _ in range(ctx.timer.repeats)]
        lat_a = statistics.median(r[0] for r in runs)
        lat_b = statistics.median(r[1] for r in runs)
        return [{**p, "sm_share_a_actual": share_a, "sm_share_b": share_b,
                 "latency_a_alone_s": ta, "latency_b_alone_s": tb, "latency_a_s": lat_a, "latency_b_s": lat_b,
                 "slowdown_a": lat_a / ta, "slowdown_b": lat_b / tb, "repeats": len(runs)}]

    def _measure_threads(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        """Method ``threads`` (CPU): the sides in two Python threads (module docstring); for a point with
        ``time_shares`` also method ``time_share`` at each share, one row each, from the same rounds."""
        fa, fb = self._side_a(p), self._side_b(p)
        shares = p.get("time_shares", [])
        ta, tb = _thread_alone(fa, 3), _thread_alone(fb, 3)   # warm-up and a first estimate
        na, nb = max(3, round(self.duration_s / ta)), max(3, round(self.duration_s / tb))
        alone_a, alone_b, runs = [], [], []
        paced_runs: dict[float, list[CoRun]] = {s: [] for s in shares}
        for i in range(self.ctx.timer.repeats):   # interleaved: a slow spell of the machine hits both
            alone_a.append(_thread_alone(fa, na))
            alone_b.append(_thread_alone(fb, nb))
            runs.append(_threads_together(fa, fb, self.duration_s))
            if i < TIME_SHARE_ROUNDS:
                model_b = self._models["lora" if p["kind_b"] == "lora" else "stage"]   # what fb runs
                for s in shares:
                    paced_runs[s].append(_time_share_together(fa, fb, model_b, s, self.duration_s))
        rows = [{**_threads_row(p, alone_a, alone_b, runs), "sm_share_a_actual": 1.0, "sm_share_b": 1.0}]
        for s in shares:
            k = len(paced_runs[s])   # the rounds' own solo latencies: the first k
            rows.append({**_threads_row(p, alone_a[:k], alone_b[:k], paced_runs[s]), "method": "time_share",
                         "sm_share_a": s, "sm_share_a_actual": s, "sm_share_b": 1.0 - s})
        return rows

    # ------------------------------------------------------------------ sides

    def _model(self, key, build):
        if key not in self._models:
            self._models[key] = build()
        return self._models[key]

    def _side_a(self, p: dict[str, Any]) -> Callable[[], None]:
        """A serving iteration as the replay's engine runs it (``calibrate.measure_serving``)."""
        from calibrate.measure_serving import decode_step, prefill_step
        from simcolo.engine.model import build_model

        ctx = self.ctx
        spec = ctx.spec_for_length(self.serving_len)
        model = self._model("full",
                            lambda: build_model(spec, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed).eval())
        if p["kind_a"] == "prefill":
            return prefill_step(ctx, model, p["a_x"], p["a_y"], salt=30)
        return decode_step(ctx, model, p["a_x"], p["a_y"], salt=31)

    def _side_b(self, p: dict[str, Any]) -> Callable[[], None]:
        from simcolo.engine.lora import apply_lora
        from simcolo.engine.model import build_model, stage_layers

        ctx, spec = self.ctx, self.ctx.spec_for_length(self.train_len)
        if p["kind_b"] == "train":
            layers = stage_layers(ctx.spec, self.num_stages, 0)
            model = self._model("stage", lambda: build_model(
                spec, device=ctx.device, dtype=ctx.dtype, layers=layers, embed=True,
                head=self.num_stages == 1, seed=ctx.seed).train())
            head = self.num_stages == 1
        else:
            def build():
                m = build_model(spec, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed).train()
                apply_lora(m, self.lora_rank, 2.0 * self.lora_rank, generator=ctx.generator(42))
                return m
            model = self._model("lora", build)
            head = True
        ids = ctx.random_ids((p["b_micro_batch"], p["b_seq_len"]), salt=33)

        def step():
            out = model(ids)
            if head:
                F.cross_entropy(out.flatten(0, 1).float(), ids.flatten()).backward()
            else:
                out.backward(torch.ones_like(out))
            model.zero_grad(set_to_none=True)

        return step

    def _partition(self, share: float) -> GreenPartition:
        if share not in self._partitions:
            self._partitions[share] = GreenPartition(self.ctx.device, share)
        return self._partitions[share]

    def close(self) -> None:
        self._models.clear()
        self._partitions.clear()


def _shapes(grid: dict, where: str, kind: str) -> list[tuple[int, int]]:
    """``grid[kind]``: a list of ``[x, y]`` pairs (prefill: batch_tokens, num_seqs; decode: batch_size,
    kv_tokens_per_seq; train/lora: micro_batch, seq_len)."""
    values = grid.get(kind, []) or []
    out = []
    for v in values:
        if (not isinstance(v, (list, tuple)) or len(v) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
            raise ConfigError(f"{where}.{kind}: {v!r}; expected pairs of positive integers")
        if kind == "prefill" and v[0] % v[1]:
            raise ConfigError(f"{where}.prefill: {list(v)}: batch_tokens must be a multiple of num_seqs")
        out.append((int(v[0]), int(v[1])))
    return out
