"""Sharing one device between a serving instance and a co-running trainer (a LoRA finetuner).

Two mechanisms, one per kind of device:

* :class:`GreenPartition` (CUDA): two streams on disjoint SM groups of one GPU, made with CUDA green
  contexts through the ``cuda-bindings`` package (``cuDevSmResourceSplitByCount`` ->
  ``cuDevResourceGenerateDesc`` -> ``cuGreenCtxCreate`` -> ``cuGreenCtxStreamCreate``, wrapped with
  ``torch.cuda.ExternalStream``). Side a gets at least ``share_a`` of the SMs (rounded up to the driver's
  granularity; ``sm_counts`` says what it got), side b the rest. Calibration
  (``calibrate/measure_interference.py``) times co-runs on them; the live replay runs a finetuner's kernels
  on side b while the serving instance keeps its own stream. :func:`green_context_status` says whether
  they work on a device, and why not.

* :class:`TimeShare` (the CPU, and CUDA time slicing): a gate that a co-runner's thread passes between
  its layers, where it may be made to sleep. :func:`paced` installs the checkpoints on a model's blocks
  (forward and backward) for the duration of a ``with`` block and removes them after; the live replay's
  finetuner paces its LoRA micro-batches with it, and calibration (``calibrate/measure_interference.py``,
  method ``time_share``) its co-run LoRA steps. :func:`layer_checkpoints` is the hook plumbing underneath.

The CPU analogue of an SM partition, and what it is not
--------------------------------------------------------
A CPU has no SMs to split. What a decode SM share of ``s`` does to a co-running finetune on a GPU is
give it ``1 - s`` of the device's compute while decode runs, and all of it when decode is idle. The
nearest honest analogue for two Python threads in one process (the live replay's CPU mode: a serving
thread and a finetune thread, each with its own torch intra-op threads) is a share of compute *time*:
while the serving instance is running an iteration, the finetune thread is kept busy at most ``1 - s``
of the wall time, by sleeping it at its next layer boundary for ``s / (1 - s)`` times the compute it
just did (a debt, paid in sleeps of at least ``min_sleep_s``, cancelled when serving goes idle: a
partition never holds SMs back from an idle GPU). With no partition (``share=None``) the gate is open
and the threads contend as plain streams would.

What it models: the finetune's progress rate under a partition (it gets ``1 - s`` of the time), and
the relief the serving thread gets from a co-runner that yields the cores, the GIL and the memory
bandwidth part of the time. What it does not model: the spatial split itself. Serving does not run
*faster* for having the finetune asleep in the sense a private SM group would make it (on a CPU with
free cores both threads may overlap anyway, while on one core the two time-share whatever the gate
says); the pacing is at layer granularity (a layer's ops run unpaced once started: the busy fraction
holds over many layers, not within one); time is wall time, so a thread that waits for the GIL or a
core while "busy" is charged for it; and serving's idle/busy state is read between layers (a change
inside a layer is seen at the next checkpoint).

Time slicing (FlexLLM-style token interleaving, ``sharing="time_slice"``): the two sides never overlap.
The gate holds the co-runner at its next layer while serving runs an iteration; the serving side pauses
after each iteration for the co-runner's slice (``replay.finetuner`` does the pausing: the iteration's
predicted solo time times ``f / (1 - f)``, ``f`` the finetune's fraction of the time), during which the
gate lets it run. While serving is idle the co-runner runs freely. On CUDA the
finetuner synchronizes its stream at each checkpoint, so that a hold stops the device work too.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterable, Iterator

import torch


# --------------------------------------------------------------------------------- green contexts

class GreenPartition:
    """Two streams on disjoint SM groups of one GPU, made with CUDA green contexts (cuda-bindings):
    ``streams[0]`` on at least ``share_a`` of the SMs, ``streams[1]`` on the rest."""

    def __init__(self, device: torch.device, share_a: float):
        from cuda.bindings import driver as cu  # ImportError -> caller records why

        def check(result):
            err, *rest = result
            if err != cu.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"CUDA driver error {err}")
            return rest[0] if len(rest) == 1 else rest

        check(cu.cuInit(0))
        dev = check(cu.cuDeviceGet(device.index or 0))
        sms = check(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        total = sms.sm.smCount
        want = max(1, round(share_a * total))
        groups, _, rest = check(cu.cuDevSmResourceSplitByCount(1, sms, 0, want))
        self.streams, self.sm_counts = [], []
        for resource in (groups[0], rest):
            desc = check(cu.cuDevResourceGenerateDesc([resource], 1))
            ctx = check(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            stream = check(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
            self.streams.append(torch.cuda.ExternalStream(int(stream), device=device))
            self.sm_counts.append(resource.sm.smCount)
        self.total_sms = total
        if self.sm_counts[1] < 1:
            raise RuntimeError(f"asking for {want} of {total} SMs left none for side b")


def green_context_status(device: torch.device) -> str | None:
    """``None`` if green contexts work here, else why not."""
    if device.type != "cuda":
        return "no CUDA device"
    try:
        part = GreenPartition(device, 0.5)
        with torch.cuda.stream(part.streams[0]):
            torch.ones(16, device=device).sum().item()
    except ImportError as exc:
        return f"cuda-bindings not importable ({exc}); `pip install cuda-bindings` to enable"
    except Exception as exc:  # driver too old, MIG, unsupported GPU, ...
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------- the time gate

class TimeShare:
    """A gate between a co-runner's layers that keeps its share of the time (module docstring).

    ``serving_busy()`` says whether the serving side is running an iteration now (read without a lock:
    a stale answer only shifts one layer's pacing). The owner calls :meth:`begin` when its thread starts
    a paced computation and :meth:`checkpoint` between layers; :meth:`interrupt` wakes a sleeping
    checkpoint early (an abort, a stop) and the checkpoint then returns at once.

    Statistics: ``busy_s`` (compute time between checkpoints, all of it) and ``paused_s`` (time slept
    or waited in checkpoints); ``charged_s`` (compute time charged while serving was busy).
    """

    def __init__(self, serving_busy: Callable[[], bool], *, min_sleep_s: float = 1e-3, poll_s: float = 5e-3,
                 clock: Callable[[], float] = time.perf_counter):
        self.serving_busy = serving_busy
        self.min_sleep_s, self.poll_s, self.clock = min_sleep_s, poll_s, clock
        self.share: float | None = None        # partition: serving's share (None: no partition)
        self.time_slice: float | None = None   # time slicing: the co-runner's fraction (None: not slicing)
        self.debt_s = 0.0                      # partition: sleep owed
        self.busy_s = self.paused_s = self.charged_s = 0.0
        self._last: float | None = None
        self._cond = threading.Condition(threading.Lock())
        self._interrupts = 0

    # ------------------------------------------------------------------ knobs (any thread)
    def set_share(self, share: float | None) -> None:
        """Partition mode: while serving is busy the co-runner is busy at most ``1 - share`` of the time
        (``None``: no limit)."""
        if share is not None and not 0.0 < share < 1.0:
            raise ValueError(f"SM share must be in (0, 1), got {share}")
        self.share, self.time_slice = share, None

    def set_time_slice(self, fraction: float | None) -> None:
        """Time-slice mode: the co-runner runs only while serving does not (``fraction``: its share of the
        time, which the serving side's pauses give it; ``None``: no limit)."""
        if fraction is not None and not 0.0 < fraction < 1.0:
            raise ValueError(f"time slice must be in (0, 1), got {fraction}")
        self.time_slice, self.share = fraction, None

    def interrupt(self) -> None:
        with self._cond:
            self._interrupts += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ the co-runner's thread
    def begin(self) -> None:
        """A paced computation starts now (what ran before it, e.g. a wait, is not charged)."""
        self._last = self.clock()
        self.debt_s = 0.0

    def checkpoint(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Between two layers: charge the compute since the last checkpoint, sleep as the knob says.
        Returns early when ``cancelled()`` turns true (checked on every wake) or on :meth:`interrupt`."""
        now = self.clock()
        ran = now - (self._last if self._last is not None else now)
        self.busy_s += ran
        busy = self.serving_busy()
        if busy:
            self.charged_s += ran
        if self.time_slice is not None:
            self._slice(ran, busy, cancelled)
        elif self.share is not None and busy:
            self.debt_s += ran * self.share / (1.0 - self.share)
            if self.debt_s >= self.min_sleep_s:
                self._pay(cancelled)
        else:
            self.debt_s = 0.0
        self._last = self.clock()

    def _pay(self, cancelled) -> None:
        """Sleep off the partition debt; stop early if serving goes idle (the GPU would be all ours)."""
        start = self.clock()
        with self._cond:
            seen = self._interrupts
            while self.debt_s > 0 and self.share is not None and self._interrupts == seen and not cancelled():
                t0 = self.clock()
                self._cond.wait(min(self.debt_s, self.poll_s))
                self.debt_s -= self.clock() - t0
                if not self.serving_busy():
                    self.debt_s = 0.0
        self.debt_s = max(0.0, self.debt_s)
        self.paused_s += self.clock() - start

    def _slice(self, ran: float, busy: bool, cancelled) -> None:
        """Time slicing: hold the co-runner while serving runs an iteration."""
        start = self.clock()
        with self._cond:
            seen = self._interrupts
            while self.time_slice is not None and self._interrupts == seen and not cancelled() and self.serving_busy():
                self._cond.wait(self.poll_s)
        self.paused_s += self.clock() - start


def layer_checkpoints(modules: Iterable[torch.nn.Module], checkpoint: Callable[[], None]) -> list:
    """Call ``checkpoint()`` before each of ``modules``' forwards and, in a backward through them, before
    each one's backward (when the gradient of its output arrives). ``checkpoint`` may raise to stop the
    computation: the exception propagates out of the forward or ``backward``/``autograd.grad`` call.
    Returns the hook handles (``handle.remove()`` to detach).

    The backward checkpoint is a tensor hook on the module's output, registered by a forward hook (only
    when autograd records): the same point as ``register_full_backward_pre_hook``, without its identity
    wrappers and without its warning for a first layer whose input needs no gradient.
    """
    def pre(_module, _args):
        checkpoint()

    def grad_hook(_grad):
        checkpoint()

    def post(_module, _args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
            output.register_hook(grad_hook)

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    return handles


# --------------------------------------------------------------------------------- pacing a model

class Cancelled(Exception):
    """Raised at a checkpoint of a :func:`paced` computation once its ``cancelled()`` is true: it propagates
    out of the forward or ``backward``/``autograd.grad`` call that was running."""


def pace_points(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Where a model is paced: before each decoder block and the LM head (``model.layers``, ``model.lm_head``
    of ``engine.model.Llama`` and of its LoRA copies), forward and backward."""
    head = getattr(model, "lm_head", None)
    return [*model.layers, *([head] if head is not None else [])]


@contextlib.contextmanager
def paced(model: torch.nn.Module, gate: TimeShare | None, *, cancelled: Callable[[], bool] = lambda: False,
          before: Callable[[], None] | None = None) -> Iterator[None]:
    """Inside the ``with`` block, every forward and backward through ``model`` passes a checkpoint between
    its layers (:func:`pace_points`): ``before()`` (e.g. synchronize the co-runner's stream, so the gate
    measures device time), then ``gate.checkpoint(cancelled)`` (pacing; skipped when ``gate`` is None:
    cancellation checks only). When ``cancelled()`` is true before or after the gate, :class:`Cancelled` is
    raised out of the forward / backward running. The gate's clock starts on entry (``gate.begin()``, so
    what ran before is not charged); on exit the hooks are removed, and a backward of a graph recorded
    inside that runs after the block passes no checkpoint (the tensor hooks left on its outputs are inert).

    One thread's computation at a time: the hooks are on the model, so a forward of the same model in
    another thread while the block is open is paced too (the live replay paces its own LoRA copy of the
    served model, which serving never runs).
    """
    active = True

    def checkpoint() -> None:
        if not active:
            return
        if cancelled():
            raise Cancelled
        if gate is not None:
            if before is not None:
                before()
            gate.checkpoint(cancelled)
            if cancelled():
                raise Cancelled

    handles = layer_checkpoints(pace_points(model), checkpoint)
    try:
        if gate is not None:
            gate.begin()
        yield
    finally:
        active = False
        for h in handles:
            h.remove()
