"""Live co-located training: the twin of ``simcolo.training.node_pipeline.NodePipeline`` on real kernels.

A node's serving replica is also trained as a pipeline of S >= 1 stages. Stage ``s`` trains
``stage_models[s]``, a slice of the served model (layers ``stage_layers(spec, S, s)``, the embedding on
stage 0, the head on stage S-1) that *shares its parameter tensors* with the served model (see
:func:`stage_models`), so serving runs each optimizer step's weights from the moment it is taken.

Each stage is a thread (``live.run_guarded``, its own CUDA stream) that runs one op at a time. Which op,
when a placed task enters stage 0 (``async``/``sync`` release, at most ``max_inflight`` in flight), the
activation memory in the stage GPU's ``MemoryPool``, the optimizer steps and the model version are the
simulator's: the same :class:`~simcolo.training.pipeline_rules.PipelineRules` code decides them. A
forward held by memory or the policy's gate is re-checked every ``gate_poll_s``.

Activations go forward and gradients backward through per-stage hand-offs (the receiving stage copies
the tensor to its device: ``.to(devices[s])``, a plain hand-off on the CPU).

Scheduler state (the rules, hand-offs) changes under ``live.lock``; kernels run outside it.

Two things a real pipeline does that this one handles its own way:

* **Optimizer steps under in-flight forwards.** With async release a stage may step while a later
  task's forward graph on it waits for its backward. An in-place update of a parameter saved by that graph
  would make its backward fail (autograd's version check). Each stage's AdamW therefore updates
  ``p.data`` views (same storage, own version counter): the in-flight backward runs against the new
  weights (no PipeDream-style weight stashing), which changes no shape and no cost.
* **Stages on other devices than the serving replica.** A tensor lives on one device, so a slice on
  ``devices[s]`` cannot share the served model's tensors when these are elsewhere (CUDA, S > 1 over
  several GPUs): :func:`stage_models` then gives the stage its own copy, and after each of its optimizer
  steps the stage copies its weights into the served model (``serves_into``).

A tied LM head (``tie_embeddings``) held by the last stage is the embedding's tensor; stage 0 owns it in
its optimizer (one update, with the gradients of both stages), as the whole-model ``TrainingRunner`` does.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

import torch
from torch import Tensor

from simcolo.engine.model import Llama, stage_layers
from simcolo.engine.runner import default_targets, next_token_loss
from simcolo.metrics.training_summary import TrainerReport
from simcolo.training.data import TrainTask
from simcolo.training.pipeline_rules import GATED, PipelineRules

LOSS_HISTORY = 4096   # (task id, loss) pairs kept in ``LiveNodePipeline.losses``


# ---------------------------------------------------------------------------------------------- models
def _canonical(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _served_name(piece: Llama, served: Llama, name: str) -> str:
    """The name in ``served`` of parameter/buffer ``name`` of the slice ``piece``."""
    if name.startswith("layers."):
        _, slot, rest = name.split(".", 2)
        layer = piece.layer_range.start + int(slot)
        if layer not in served.layer_range:
            raise ValueError(f"layer {layer} is not held by the served model (layers {served.layer_range})")
        return f"layers.{layer - served.layer_range.start}.{rest}"
    return name


def stage_slice(served: Llama, num_stages: int, stage: int, device=None, *, copy: bool = False) -> Llama:
    """Stage ``stage`` of ``num_stages`` of ``served``: layers ``stage_layers(spec, S, s)``, the embedding
    on the first stage, the final norm and LM head on the last.

    On ``served``'s own device (``device`` None or the same) and without ``copy``, its parameters and
    buffers ARE ``served``'s tensors (like ``weight_sharing_copy``): training the slice trains the served
    model. Otherwise the slice is a copy on ``device`` with the same weights, and ``slice.serves_into``
    lists ``(slice tensor, served tensor)`` pairs to copy back after each optimizer step.
    """
    spec = served.spec
    layers = stage_layers(spec, num_stages, stage)
    embed, head = stage == 0, stage == num_stages - 1
    p0 = next(served.parameters())
    device = p0.device if device is None else _canonical(device)
    share = not copy and device == p0.device
    if share and num_stages == 1:
        served.serves_into = []
        return served
    with torch.device("meta"):
        piece = Llama(spec, layers, embed, head, rope_theta=served.rope_theta)
    if share:
        for name, _ in list(piece.named_parameters(remove_duplicate=False)):
            owner, _, attr = name.rpartition(".")
            setattr(piece.get_submodule(owner), attr, served.get_parameter(_served_name(piece, served, name)))
        for name, _ in list(piece.named_buffers(remove_duplicate=False)):
            owner, _, attr = name.rpartition(".")
            piece.get_submodule(owner).register_buffer(attr, served.get_buffer(name), persistent=False)
        piece.serves_into = []
        return piece.train(served.training)
    piece = piece.to(p0.dtype)
    piece.tie_weights()
    piece = piece.to_empty(device=device)
    piece.tie_weights()
    pairs, claimed = [], set()
    with torch.no_grad():
        for name, p in piece.named_parameters():
            src = served.get_parameter(_served_name(piece, served, name))
            p.copy_(src)
            if id(src) not in claimed:   # a tied head copy does not write over the embedding
                claimed.add(id(src))
                pairs.append((p, src))
    for name, _ in list(piece.named_buffers(remove_duplicate=False)):   # the float32 rope tables
        owner, _, attr = name.rpartition(".")
        piece.get_submodule(owner).register_buffer(attr, served.get_buffer(name).to(device), persistent=False)
    piece.serves_into = pairs
    return piece.train(served.training)


def stage_models(served: Llama, num_stages: int, devices: list, *, copy: bool = False) -> list[Llama]:
    """The slices a :class:`LiveNodePipeline` of ``num_stages`` stages on ``devices`` trains over the served
    (whole) model ``served``: sharing its tensors where a stage is on its device, copies elsewhere (see
    :func:`stage_slice`). For S = 1 on the serving device this is ``[served]`` itself."""
    if len(devices) != num_stages:
        raise ValueError(f"{num_stages} stages but {len(devices)} devices")
    if not served.is_whole:
        raise ValueError("stage_models needs the whole served model")
    return [stage_slice(served, num_stages, s, devices[s], copy=copy) for s in range(num_stages)]


def task_tokens(index: int, task_id: int, vocab: int, micro_batch: int, seq_len: int) -> Tensor:
    """A task's ``[micro_batch, seq_len]`` random token ids (CPU), seeded by the node and the task id
    (the seeding of ``replay/train_process.py``)."""
    gen = torch.Generator().manual_seed(1_000_003 * (index + 1) + task_id)
    return torch.randint(vocab, (micro_batch, seq_len), generator=gen)


def _receive(x: Tensor, device: torch.device) -> Tensor:
    """A tensor another stage's thread made (its kernels done), on ``device``. On CUDA the tensor's block
    belongs to the sender's stream: record that this thread's stream reads it (or copies it), so the
    allocator does not hand it out again while that is in flight."""
    if x.is_cuda:
        x.record_stream(torch.cuda.current_stream(x.device))
    return x.to(device)


# ---------------------------------------------------------------------------------------------- pipeline
class LiveNodePipeline:
    """The training side of a live co-located node: S stage threads over ``stage_models`` (see the module
    docstring). Implements what ``colocation.nodes.Node`` and the live backend read: ``S``, ``index``,
    ``place``, ``stage_backlogs_s``, ``busy``, ``version``, ``train_busy_s``, ``report``."""

    def __init__(self, index: int, stage_models: list, devices: list, gpus: list[int], live,
                 forward_s: list[float], backward_s: list[float], optimizer_s: list[float],
                 activation_bytes: list[float], global_batch: int, release: str, max_inflight: int,
                 pools: list, gate: Callable[[int, float], bool] | None, vocab_size: int, seq_len: int,
                 on_task_done: Callable[[TrainTask], None], on_version: Callable[["LiveNodePipeline"], None], *,
                 serving_idle: Callable[[], bool] = lambda: False,
                 serving_iterations: Callable[[], int] | None = None,
                 lr: float = 1e-5, gate_poll_s: float = 0.005):
        S = len(stage_models)
        for what, xs in (("devices", devices), ("gpus", gpus)):
            if len(xs) != S:
                raise ValueError(f"node {index}: {S} stage models but {len(xs)} {what}")
        for s, m in enumerate(stage_models):
            if (m.embed_tokens is not None) != (s == 0) or (m.lm_head is not None) != (s == S - 1):
                raise ValueError(f"node {index}: stage {s} of {S} must hold the embedding iff first and the "
                                 f"head iff last")
        # scheduler state, under live.lock (the rules check the other per-stage lists and the settings)
        self.rules = PipelineRules(index, gpus, pools, forward_s, backward_s, optimizer_s, activation_bytes,
                                   global_batch, release, max_inflight, gate)
        self.index, self.live, self.S = index, live, S
        self.stage_models = list(stage_models)
        self.devices = [_canonical(d) for d in devices]
        self.gpus = list(gpus)
        self.gate_poll_s = gate_poll_s
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.on_task_done, self.on_version = on_task_done, on_version
        self.serving_idle, self.serving_iterations = serving_idle, serving_iterations

        # optimizers: each parameter tensor is owned by the first stage holding it; AdamW updates p.data views
        owned: set[int] = set()
        self._params: list[list[Tensor]] = []
        self._shadows: list[list[Tensor]] = []
        self.optimizers: list[torch.optim.Optimizer | None] = []
        for m in self.stage_models:
            ps = [p for p in m.parameters() if id(p) not in owned]
            owned.update(id(p) for p in ps)
            shadows = [p.data for p in ps]
            self._params.append(ps)
            self._shadows.append(shadows)
            self.optimizers.append(torch.optim.AdamW(shadows, lr=lr) if shadows else None)

        self._conds = [live.condition() for _ in range(S)]   # wakes stage s's thread
        self._fwd_in: list[dict] = [{} for _ in range(S)]     # task id -> activations from stage s-1
        self._grad_in: list[dict] = [{} for _ in range(S)]    # task id -> gradient from stage s+1
        self._running: list[tuple[str, float] | None] = [None] * S   # (op, start) of each stage's kernel
        self.solo_s = [0.0, 0.0]       # (measured, predicted) kernel seconds that ran with serving idle
        self.losses: deque[tuple[int, float]] = deque(maxlen=LOSS_HISTORY)   # (task id, loss), last stage
        self._stopping = False
        # per-stage autograd state of tasks between forward and backward (only stage s's thread touches it)
        self._graphs: list[dict] = [{} for _ in range(S)]
        self.threads = [threading.Thread(target=self._main, args=(s,), name=f"pipeline-{index}-stage-{s}",
                                         daemon=True) for s in range(S)]

    # ------------------------------------------------------------------ what the backend and Node read
    @property
    def thread(self) -> threading.Thread:
        return self.threads[0]

    @property
    def gpu(self) -> int:
        return self.gpus[0]

    @property
    def busy(self) -> bool:
        """Some stage is running a kernel now."""
        return any(r is not None for r in self._running)

    @property
    def version(self) -> int:
        return self.rules.version

    @property
    def train_busy_s(self) -> float:
        return sum(self.rules.stage_busy_s)

    def busy_by_gpu(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for g, busy in zip(self.gpus, self.rules.stage_busy_s):
            out[g] = out.get(g, 0.0) + busy
        return out

    def stage_backlogs_s(self) -> list[float]:
        """See ``PipelineRules.backlogs_s``."""
        with self.live.lock:
            return self.rules.backlogs_s(self._running, self.live.now)

    def report(self) -> TrainerReport:
        with self.live.lock:
            return self.rules.report(self.live.now)

    def close(self, now: float | None = None) -> None:
        """Nothing to release (the threads end with ``stop_and_join``)."""

    # ------------------------------------------------------------------ intake and release (under the lock)
    def place(self, task: TrainTask) -> None:
        with self.live.lock:
            self.rules.place(task)
            self._release()

    def _release(self) -> None:
        while self.rules.release_next(self.live.now):
            self._conds[0].notify()

    # ------------------------------------------------------------------ threads
    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop_and_join(self, timeout: float | None = None) -> None:
        with self.live.lock:
            self._stopping = True
            for c in self._conds:
                c.notify_all()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout)

    def _main(self, s: int) -> None:
        self.live.run_guarded(f"node {self.index} training stage {s}", self.devices[s], lambda: self._loop(s))

    def _loop(self, s: int) -> None:
        live, cond = self.live, self._conds[s]
        while True:
            with cond:
                while True:
                    if live.stopped or self._stopping:
                        return
                    op, task, x = self._next_op(s)
                    if op is not None and op != GATED:
                        break
                    # the memory gate opens as serving frees KV blocks, which nobody signals: poll it
                    cond.wait(self.gate_poll_s if op == GATED else None)
                start = live.now
                self._running[s] = (op, start)
                idle = self.serving_idle()
                iters = self.serving_iterations() if self.serving_iterations is not None else None
            try:
                out = self._kernel(s, op, task, x)
            except BaseException:
                with cond:
                    self._running[s] = None
                raise
            with cond:
                end = live.now
                self._running[s] = None
                self.rules.stage_busy_s[s] += end - start
                if idle and self.serving_idle() and (iters is None or self.serving_iterations() == iters):
                    self.solo_s[0] += end - start
                    self.solo_s[1] += self.rules.solo_s(s, op)
                self._finish(s, op, task, out)

    def _next_op(self, s: int):
        """Under the lock: the stage's next op (``PipelineRules.next_op``), its task and its input (the
        activations or gradient another stage handed over)."""
        op, task = self.rules.next_op(s)
        if op == "F":
            return op, task, self._fwd_in[s].pop(task.id, None)
        if op == "B":
            return op, task, self._grad_in[s].pop(task.id, None)
        return op, task, None

    def _finish(self, s: int, op: str, task, out) -> None:
        """Under the lock: account for a finished op (``PipelineRules``) and pass its result on."""
        rules = self.rules
        if op == "F":
            if rules.forward_done(s, task):
                self._fwd_in[s + 1][task.id] = out
                rules.ready_f[s + 1].append(task)
                self._conds[s + 1].notify()
            else:
                self.losses.append((task.id, out))
            if s == 0 and rules.release == "async":
                self._release()
        elif op == "B":
            if rules.backward_done(s, task):
                self._grad_in[s - 1][task.id] = out
                rules.ready_b[s - 1].append(task)
                self._conds[s - 1].notify()
            else:
                rules.task_done(task, self.live.now)
                self.on_task_done(task)
                self._release()
        elif rules.step_done(s):
            self.on_version(self)

    # ------------------------------------------------------------------ kernels (outside the lock)
    def _kernel(self, s: int, op: str, task, x):
        dev = self.devices[s]
        if op == "F":
            out = self._forward(s, task, x)
        elif op == "B":
            out = self._backward(s, task, x)
        else:
            self._optimizer_step(s)
            out = None
        self.live.synchronize(dev)
        if op == "F" and s == self.S - 1:
            out = out.item()   # the loss (its kernels are done)
        return out

    def _forward(self, s: int, task, x) -> Tensor:
        """Stage ``s``'s forward of ``task`` (``x``: the previous stage's activations; token ids on stage
        0). Keeps the graph for the backward; returns the activations to send on (detached), or on the
        last stage the loss (detached)."""
        dev, model = self.devices[s], self.stage_models[s]
        if s == 0:
            ids = task_tokens(self.index, task.id, self.vocab_size, task.micro_batch, task.seq_len)
            inp, h = None, model(ids.to(dev))
        else:
            inp = _receive(x, dev).detach().requires_grad_(True)
            h = model(inp)
        if s == self.S - 1:
            ids = task_tokens(self.index, task.id, self.vocab_size, task.micro_batch, task.seq_len)
            h = next_token_loss(h, default_targets(ids).to(dev))
        self._graphs[s][task.id] = (inp, h)
        return h.detach()

    def _backward(self, s: int, task, grad) -> Tensor | None:
        """Stage ``s``'s backward of ``task`` from ``grad`` (the next stage's gradient of this stage's
        output; none on the last stage). Returns the gradient of its input (None on stage 0)."""
        inp, out = self._graphs[s].pop(task.id)
        if s == self.S - 1:
            out.backward()
        else:
            out.backward(_receive(grad, self.devices[s]))
        return None if inp is None else inp.grad

    def _optimizer_step(self, s: int) -> None:
        opt = self.optimizers[s]
        if opt is not None:
            params, shadows = self._params[s], self._shadows[s]
            for p, q in zip(params, shadows):
                q.grad = p.grad
            opt.step()
            for p, q in zip(params, shadows):
                q.grad = None
                p.grad = None
        pairs = getattr(self.stage_models[s], "serves_into", ())
        if pairs:
            with torch.no_grad():
                for src, dst in pairs:
                    dst.data.copy_(src.data, non_blocking=True)
            for dev in {dst.device for _, dst in pairs}:   # the version is served once the copy is in
                self.live.synchronize(dev)

    # ------------------------------------------------------------------ warm-up
    def warm_up(self, iterations: int, micro_batch: int, seq_len: int) -> None:
        """Untimed forwards and backwards of ``iterations`` tasks through every stage and one optimizer
        step per stage at learning rate 0 (first calls pay one-off costs); then gradients and optimizer
        state are dropped: the weights are unchanged and training starts from scratch. Call before
        ``start``."""
        tasks = [TrainTask(-1 - i, 0.0, micro_batch, seq_len) for i in range(iterations)]
        for task in tasks:
            x = None
            for s in range(self.S):
                x = self._forward(s, task, x)
            g = None
            for s in reversed(range(self.S)):
                g = self._backward(s, task, g)
        for s, opt in enumerate(self.optimizers):
            if opt is None:
                continue
            lrs = [group["lr"] for group in opt.param_groups]
            for group in opt.param_groups:
                group["lr"] = 0.0
            for p, q in zip(self._params[s], self._shadows[s]):
                q.grad = p.grad if p.grad is not None else torch.zeros_like(q)
            opt.step()
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
            opt.state.clear()
            for p, q in zip(self._params[s], self._shadows[s]):
                q.grad = None
                p.grad = None
        for s in range(self.S):
            self._graphs[s].clear()
            self.live.synchronize(self.devices[s])
