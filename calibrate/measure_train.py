"""Training tables: one pipeline stage with full-parameter AdamW (``train_stage``) and the whole model
with LoRA adapters (``lora_step``), each split into its three phases.

A point is timed in three phases, each its own row: ``forward`` (with autograd recording, including
the loss on the last stage), ``backward`` (each timed call gets a fresh untimed forward as setup) and
``optimizer`` (one ``AdamW.step()``). One untimed full step runs first, so gradients and optimizer
state exist and every phase sees steady-state memory.

Stages (``train_stage``): for each ``num_stages`` in the grid the model's layers are split with
``stage_layers``; the first stage holds the embedding, the last the final norm, LM head and loss (so
with one stage it is the whole model), a middle stage neither. Measured are the first, one middle
(when there are >= 3 stages) and the last stage. A stage without the embedding takes hidden states
that require grad, as a pipeline stage receives them; one without the head is back-propagated from
a random output gradient, as the next stage would send it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from calibrate import memory
from calibrate.context import Context
from calibrate.grids import axis
from simcolo.errors import ConfigError

PHASES = ("forward", "backward", "optimizer")


def representative_stages(num_stages: int) -> list[int]:
    return sorted({0, num_stages - 1} | ({1} if num_stages >= 3 else set()))


def _time_phases(ctx: Context, model: torch.nn.Module, params: list, micro_batch: int, seq_len: int,
                 embed: bool, head: bool, salt: int) -> dict[str, Any]:
    """Time forward/backward/optimizer of ``model`` on one micro-batch; returns Timing per phase."""
    spec = ctx.spec
    opt = torch.optim.AdamW(params, lr=1e-5)
    if embed:
        x = ctx.random_ids((micro_batch, seq_len), salt=salt)
    else:
        x = torch.randn(micro_batch, seq_len, spec.hidden_size, device=ctx.device, dtype=ctx.dtype,
                        generator=ctx.generator(salt), requires_grad=True)
    if head:
        targets = ctx.random_ids((micro_batch, seq_len), salt=salt + 1)
    else:
        grad_out = torch.randn(micro_batch, seq_len, spec.hidden_size, device=ctx.device, dtype=ctx.dtype,
                               generator=ctx.generator(salt + 2))
    held: list[torch.Tensor] = []

    def forward():
        out = model(x)
        if head:
            out = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
        return out

    def setup_backward():
        held.clear()
        if not embed:
            x.grad = None
        held.append(forward())

    def backward():
        out = held.pop()
        if head:
            out.backward()
        else:
            out.backward(grad_out)

    setup_backward()
    backward()
    opt.step()  # steady state: gradients and AdamW moments exist from here on
    timings = {"forward": ctx.timer(forward), "backward": ctx.timer(backward, setup=setup_backward),
               "optimizer": ctx.timer(opt.step)}
    held.clear()
    opt.zero_grad(set_to_none=True)
    return timings


def _rows(point: dict[str, Any], extra: dict[str, Any], timings: dict, estimate: int) -> list[dict]:
    rows = []
    for phase in PHASES:
        t = timings[phase]
        rows.append({**point, **extra, "phase": phase, "latency_s": t.median_s, "latency_std_s": t.std_s,
                     "repeats": t.repeats,
                     "peak_memory_bytes": t.peak_memory_bytes if t.peak_memory_bytes is not None else estimate})
    return rows


class TrainStageMeasurer:
    table = "train_stage"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.stages = axis(grid, where, "num_stages")
        self.micro_batches = axis(grid, where, "micro_batch", min_len=2)
        self.seq_lens = axis(grid, where, "seq_len", min_len=2)
        too_many = [n for n in self.stages if n > ctx.spec.num_layers]
        if too_many:
            raise ConfigError(f"{where}.num_stages: {too_many} exceed the model's {ctx.spec.num_layers} layers")

    def points(self) -> list[dict[str, Any]]:
        return [{"num_stages": n, "stage": s, "micro_batch": b, "seq_len": t}
                for n in self.stages for s in representative_stages(n)
                for b in self.micro_batches for t in self.seq_lens]

    def _layout(self, p: dict[str, Any]):
        from simcolo.engine.model import stage_layers

        layers = stage_layers(self.ctx.spec, p["num_stages"], p["stage"])
        return layers, p["stage"] == 0, p["stage"] == p["num_stages"] - 1

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        layers, embed, head = self._layout(p)
        return memory.training_bytes(self.ctx.spec, len(layers), embed, head, p["micro_batch"], p["seq_len"],
                                     self.ctx.dtype_bytes)

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        from simcolo.engine.model import build_model

        ctx = self.ctx
        layers, embed, head = self._layout(p)
        spec = ctx.spec_for_length(max(self.seq_lens))
        model = ctx.model(("stage", p["num_stages"], p["stage"], spec.max_context_len),
                          lambda: build_model(spec, device=ctx.device, dtype=ctx.dtype, layers=layers,
                                              embed=embed, head=head, seed=ctx.seed).train())
        params = [q for q in model.parameters() if q.requires_grad]
        timings = _time_phases(ctx, model, params, p["micro_batch"], p["seq_len"], embed, head, salt=10)
        return _rows(p, {"num_layers": len(layers)}, timings, self.estimate_bytes(p))

    def close(self) -> None:
        pass


def check_targets(spec, targets: tuple[str, ...], where: str) -> None:
    from simcolo.engine.lora import lora_param_count

    try:
        lora_param_count(spec, 1, targets)
    except ValueError as exc:
        raise ConfigError(f"{where}.targets: {exc}") from None


class LoraStepMeasurer:
    table = "lora_step"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.ranks = axis(grid, where, "rank")
        self.micro_batches = axis(grid, where, "micro_batch", min_len=2)
        self.seq_lens = axis(grid, where, "seq_len", min_len=2)
        self.alpha = float(grid.get("alpha", 16))
        targets = grid.get("targets", ["q_proj", "v_proj"])
        self.targets = tuple(targets if isinstance(targets, (list, tuple)) else [targets])
        check_targets(ctx.spec, self.targets, where)

    def points(self) -> list[dict[str, Any]]:
        return [{"rank": r, "micro_batch": b, "seq_len": t}
                for r in self.ranks for b in self.micro_batches for t in self.seq_lens]

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        from simcolo.engine.lora import lora_param_count

        spec = self.ctx.spec
        trainable = lora_param_count(spec, p["rank"], self.targets)
        return memory.training_bytes(spec, spec.num_layers, True, True, p["micro_batch"], p["seq_len"],
                                     self.ctx.dtype_bytes, trainable_params=trainable)

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        from simcolo.engine.lora import apply_lora
        from simcolo.engine.model import build_model

        ctx = self.ctx
        spec = ctx.spec_for_length(max(self.seq_lens))

        def build():
            model = build_model(spec, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed).train()
            model.lora_params = apply_lora(model, p["rank"], self.alpha, self.targets,
                                           generator=ctx.generator(40))
            return model

        model = ctx.model(("lora", p["rank"], spec.max_context_len), build)
        params = model.lora_params
        timings = _time_phases(ctx, model, params, p["micro_batch"], p["seq_len"], True, True, salt=20)
        extra = {"num_layers": spec.num_layers, "trainable_params": sum(q.numel() for q in params)}
        return _rows(p, extra, timings, self.estimate_bytes(p))

    def close(self) -> None:
        pass
