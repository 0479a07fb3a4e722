"""One synchronous training step of a pipeline on simulated GPUs.

:func:`run_step` runs it event by event; :func:`step_template` computes, once, what it does on GPUs of its
own (the isolated trainer's case), and a test holds the two equal. Event by event, each stage is a SimPy process that reads like the schedule: for each operation, wait for its input
(the previous stage's activation for a forward, the next stage's gradient for a backward), run the
kernel on the stage's GPU through processor-sharing compute (so co-running inference slows it), and
send the result on over the link. Activations are held in the stage's GPU memory from a micro-batch's
forward to its backward. After its last backward a stage runs its optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from simcolo.hardware.compute import SharedCompute
from simcolo.hardware.environment import SimEnvironment
from simcolo.hardware.memory import MemoryPool
from simcolo.training.schedules import Op


@dataclass
class StageSpec:
    compute: SharedCompute
    forward_s: float            # solo seconds per micro-batch
    backward_s: float
    optimizer_s: float = 0.0
    memory: MemoryPool | None = None
    activation_bytes: float = 0.0   # held per micro-batch from its forward to its backward


@dataclass
class StepResult:
    start_s: float
    end_s: float
    records: list[tuple[int, str, int, float, float]] = field(default_factory=list)  # stage, kind, mb, start, end
    busy_s: list[float] = field(default_factory=list)            # forward + backward time per stage
    peak_activation_bytes: list[float] = field(default_factory=list)

    @property
    def step_time_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def compute_end_s(self) -> float:
        """When the last backward finished (the step without its optimizer phase)."""
        return max(end for _, kind, _, _, end in self.records if kind == "B")

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the stages over the forward/backward phase: 1 - sum(F+B busy) / (S * span).
        The optimizer phase is not counted (it is the same for every schedule)."""
        span = self.compute_end_s - self.start_s
        return 1.0 - sum(self.busy_s) / (len(self.busy_s) * span)


def run_step(env: SimEnvironment, stages: list[StageSpec], schedule: list[list[Op]], link_s: float = 0.0):
    """Start one training step now; returns (process, result). The result is complete when the process ends."""
    if len(schedule) != len(stages):
        raise ValueError(f"schedule has {len(schedule)} stages, the pipeline {len(stages)}")
    S = len(stages)
    micro_batches = {op.micro_batch for op in schedule[0]}
    # inputs[s][("F"|"B", mb)]: fires when that operation's input is available at stage s
    inputs = [{(k, mb): env.event() for k in "FB" for mb in micro_batches} for _ in range(S)]
    for mb in micro_batches:
        inputs[0][("F", mb)].succeed()   # the data loader feeds stage 0
    result = StepResult(env.now, env.now, busy_s=[0.0] * S, peak_activation_bytes=[0.0] * S)

    def send(event, delay: float) -> None:
        if delay > 0:
            env.timeout(delay).callbacks.append(lambda _ev: event.succeed())
        else:
            event.succeed()

    def stage(s: int):
        spec, held = stages[s], 0.0
        for op in schedule[s]:
            yield inputs[s][(op.kind, op.micro_batch)]
            start = env.now
            if op.kind == "F":
                if spec.memory is not None:
                    spec.memory.allocate("train_activations", spec.activation_bytes)
                held += spec.activation_bytes
                result.peak_activation_bytes[s] = max(result.peak_activation_bytes[s], held)
                yield spec.compute.run("train_forward", spec.forward_s)
                if s + 1 < S:
                    send(inputs[s + 1][("F", op.micro_batch)], link_s)
                else:
                    inputs[s][("B", op.micro_batch)].succeed()   # the loss is computed on the last stage
            else:
                yield spec.compute.run("train_backward", spec.backward_s)
                if spec.memory is not None:
                    spec.memory.release("train_activations", spec.activation_bytes)
                held -= spec.activation_bytes
                if s > 0:
                    send(inputs[s - 1][("B", op.micro_batch)], link_s)
            result.busy_s[s] += env.now - start
            result.records.append((s, op.kind, op.micro_batch, start, env.now))
        if spec.optimizer_s > 0:
            yield spec.compute.run("optimizer", spec.optimizer_s)

    def step():
        yield env.all_of([env.process(stage(s)) for s in range(S)])
        result.end_s = env.now

    return env.process(step()), result


@dataclass(frozen=True)
class StepTemplate:
    """One synchronous step on dedicated GPUs (nothing else runs on them, so every kernel takes its solo
    time), in time relative to the step's start: what a :func:`run_step` step does there, computed once.

    ``ops[s]``: (kind, start, end) of stage ``s``'s forwards and backwards in order; ``compute_end_s``: the
    last backward's end; ``duration_s``: the whole step (all-reduce and optimizer included);
    ``peak_activation_bytes[s]``: the most activations stage ``s`` holds at once."""
    ops: tuple[tuple[tuple[str, float, float], ...], ...]
    compute_end_s: float
    duration_s: float
    busy_s: tuple[float, ...]                 # forward + backward seconds per stage
    gpu_busy_s: tuple[float, ...]             # ... plus the stage's optimizer: its GPU's busy time per step
    peak_activation_bytes: tuple[float, ...]
    optimizer_start_s: float                  # every stage's optimizer starts here (after the all-reduce)
    optimizer_s: tuple[float, ...]

    def gpu_busy_until(self, s: int, t: float, partial: bool) -> float:
        """Busy seconds of stage ``s``'s GPU from the step's start to ``t``: with ``partial``, the kernel
        running at ``t`` counts up to ``t`` (a timeline sample); without, only kernels ended by ``t`` count
        (the processor-sharing clock charges a kernel when it ends)."""
        opt = ("O", self.optimizer_start_s, self.optimizer_start_s + self.optimizer_s[s])
        busy = 0.0
        for _, start, end in (*self.ops[s], opt):
            if end <= t:
                busy += end - start
            elif partial and start < t:
                busy += t - start
        return busy


def step_template(forward_s: list[float], backward_s: list[float], optimizer_s: list[float],
                  activation_bytes: list[float], schedule: list[list[Op]], link_s: float = 0.0,
                  allreduce_s: float = 0.0) -> StepTemplate:
    """The :class:`StepTemplate` of one step: each stage runs its operations in schedule order, an
    operation starting when both the stage is free and its input is there (stage 0's forwards at once;
    a forward's activation ``link_s`` after the previous stage's forward; the last stage's backward as
    its forward ends; a gradient ``link_s`` after the next stage's backward). Then the gradients are
    all-reduced (``allreduce_s``) and every stage runs its optimizer."""
    S = len(schedule)
    ends: dict[tuple[str, int, int], float] = {}
    ops: list[list[tuple[str, float, float]]] = [[] for _ in range(S)]
    free = [0.0] * S
    nxt = [0] * S
    held, peak = [0.0] * S, [0.0] * S
    left = sum(len(s) for s in schedule)
    while left:
        progressed = False
        for s in range(S):
            while nxt[s] < len(schedule[s]):
                op = schedule[s][nxt[s]]
                if op.kind == "F":
                    ready = 0.0 if s == 0 else ends.get(("F", s - 1, op.micro_batch))
                    if ready is not None and s > 0 and link_s > 0:
                        ready = ready + link_s
                    work = forward_s[s]
                else:
                    if s == S - 1:
                        ready = ends.get(("F", s, op.micro_batch))
                    else:
                        ready = ends.get(("B", s + 1, op.micro_batch))
                        if ready is not None and link_s > 0:
                            ready = ready + link_s
                    work = backward_s[s]
                if ready is None:
                    break
                start = max(free[s], ready)
                end = start + work
                ends[(op.kind, s, op.micro_batch)] = end
                ops[s].append((op.kind, start, end))
                free[s] = end
                if op.kind == "F":
                    held[s] += activation_bytes[s]
                    peak[s] = max(peak[s], held[s])
                else:
                    held[s] -= activation_bytes[s]
                nxt[s] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError("pipeline schedule deadlocks: an operation waits for one that never runs")
    compute_end = max(free)
    after = compute_end + allreduce_s if allreduce_s > 0 else compute_end
    duration = after + max(optimizer_s) if optimizer_s and max(optimizer_s) > 0 else after
    busy = tuple(sum(e - b for _, b, e in ops[s]) for s in range(S))
    return StepTemplate(tuple(tuple(o) for o in ops), compute_end, duration, busy,
                        tuple(busy[s] + optimizer_s[s] for s in range(S)), tuple(peak), after, tuple(optimizer_s))
