"""One synchronous training step of a pipeline on simulated GPUs.

Each stage is a SimPy process that reads like the schedule: for each operation, wait for its input
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
