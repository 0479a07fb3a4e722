"""The learning curve (``learning_curve``): loss against optimizer steps of a short, real LoRA
finetuning of a small model, for the simulator's inference-loss (model freshness) model.

The task is next-token prediction on sequences drawn from a Markov chain over ``num_states`` tokens
in which every token has ``branching`` possible successors with Dirichlet(1) probabilities. Every
``shift_every`` optimizer steps the chain is replaced by a new random one: the data distribution
shifts, the loss jumps, and further steps bring it down again -- the situation of a model that is
continuously finetuned on fresh data while it serves.

Row ``step`` = k holds the loss of the model after k optimizer steps on a freshly drawn batch that it
has not trained on (the batch is then used for step k + 1), i.e. the loss a request would see if
served by model version k. ``distribution`` numbers the active chain. The model (``model``, a
``conf/model`` name, the tiny one by default) starts from random weights with a frozen base, as in
the other measurements; only the adapters train.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from calibrate.context import Context
from calibrate.grids import scalar
from calibrate.measure_train import check_targets
from simcolo.errors import ConfigError
from simcolo.specs import load_model_spec

KEYS = ("model", "steps", "shift_every", "micro_batch", "seq_len", "num_states", "branching", "rank",
        "alpha", "lr")


class MarkovStream:
    """Batches of token sequences from a Markov chain that is redrawn every ``shift_every`` steps."""

    def __init__(self, num_states: int, branching: int, seed: int):
        self.n, self.k = num_states, min(branching, num_states)
        self.gen = torch.Generator().manual_seed(seed)
        self.distribution = -1
        self.shift()

    def shift(self) -> None:
        n, k = self.n, self.k
        probs = torch.zeros(n, n)
        succ = torch.rand(n, n, generator=self.gen).argsort(dim=1)[:, :k]
        probs.scatter_(1, succ, _dirichlet(n, k, self.gen))
        self.probs = probs
        self.distribution += 1

    def batch(self, batch: int, length: int) -> torch.Tensor:
        seq = torch.empty(batch, length, dtype=torch.long)
        seq[:, 0] = torch.randint(0, self.n, (batch,), generator=self.gen)
        for t in range(1, length):
            seq[:, t] = torch.multinomial(self.probs[seq[:, t - 1]], 1, generator=self.gen).squeeze(1)
        return seq


def _dirichlet(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Dirichlet(1, ..., 1) rows: normalised exponentials (seeded, unlike torch.distributions)."""
    e = -torch.log(torch.rand(rows, k, generator=gen).clamp_min(1e-12))
    return e / e.sum(dim=1, keepdim=True)


class LearningCurveMeasurer:
    table = "learning_curve"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.params: dict[str, Any] = {"model": str(grid.get("model", ctx.spec.name))}
        for key, kind in (("steps", int), ("shift_every", int), ("micro_batch", int), ("seq_len", int),
                          ("num_states", int), ("branching", int), ("rank", int), ("alpha", float),
                          ("lr", float)):
            self.params[key] = scalar(grid, where, key, kind)
        targets = grid.get("targets", ["q_proj", "v_proj"])
        self.targets = tuple(targets if isinstance(targets, (list, tuple)) else [targets])
        self.params["targets"] = list(self.targets)
        self.spec = load_model_spec(self.params["model"])
        check_targets(self.spec, self.targets, where)
        if self.params["num_states"] > self.spec.vocab_size:
            raise ConfigError(f"{where}.num_states: {self.params['num_states']} exceeds model "
                              f"{self.spec.name}'s vocabulary of {self.spec.vocab_size}")

    def points(self) -> list[dict[str, Any]]:
        return [dict(self.params)]

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        from calibrate import memory
        from simcolo.engine.lora import lora_param_count

        return memory.training_bytes(self.spec, self.spec.num_layers, True, True, p["micro_batch"], p["seq_len"],
                                     self.ctx.dtype_bytes,
                                     trainable_params=lora_param_count(self.spec, p["rank"], self.targets))

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        from simcolo.engine.lora import apply_lora
        from simcolo.engine.model import build_model

        ctx = self.ctx
        spec = replace(self.spec, max_context_len=max(self.spec.max_context_len, p["seq_len"]))
        model = build_model(spec, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed).train()
        params = apply_lora(model, p["rank"], p["alpha"], self.targets, generator=ctx.generator(41))
        opt = torch.optim.AdamW(params, lr=p["lr"])
        data = MarkovStream(p["num_states"], p["branching"], seed=ctx.seed + 7)
        rows = []
        for step in range(p["steps"]):
            if step and step % p["shift_every"] == 0:
                data.shift()
            tokens = data.batch(p["micro_batch"], p["seq_len"] + 1).to(ctx.device)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            rows.append({"step": step, "loss": float(loss.detach()), "distribution": data.distribution})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del model, opt, params
        return rows

    def close(self) -> None:
        pass
