"""LoRA adapters (Hu et al., 2021) on the model of ``engine/model.py``.

A frozen ``nn.Linear`` ``W`` becomes ``y = W x + (alpha / rank) * B A x`` with ``A`` ``[rank, in]`` and
``B`` ``[out, rank]``. ``B`` starts at zero, so the adapted model computes exactly what the base model
does until the first optimizer step. Targets are attribute names (``q_proj``, ``v_proj``,
``gate_proj``, ``lm_head``, ...), as in Hugging Face PEFT.

``apply_lora`` rewires the model it is given. To fine-tune a model that is also being served, apply it
to a ``weight_sharing_copy`` of that model (what ``engine/runner.py``'s ``LoraTrainingRunner`` does).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from simcolo.specs import ModelSpec


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``: ``y = base(x) + (alpha / rank) * lora_B(lora_A(x))``. The adapters
    live on the base's device and in its dtype. ``A`` is initialised like ``nn.Linear``'s default
    (Kaiming-uniform), ``B`` with zeros."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = ("q_proj", "v_proj"), *,
               generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Replace every ``nn.Linear`` of ``model`` whose attribute name is in ``targets`` by a
    ``LoRALinear``, freeze all other parameters, and return the adapter parameters (the only trainable
    ones), in module order. ``generator`` (on the model's device) makes the init of ``A`` reproducible;
    without it the global RNG is used. A target that names no linear layer is a ValueError."""
    targets = tuple(targets)
    found = [(parent, attr, child) for parent in model.modules()
             for attr, child in parent.named_children() if attr in targets and isinstance(child, nn.Linear)]
    unknown = [t for t in targets if t not in {attr for _, attr, _ in found}]
    if unknown:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target(s) {unknown} match no linear layer of the model; its linear layers "
                         f"are named {linears}")
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for parent, attr, child in found:
        adapted = LoRALinear(child, rank, alpha, generator=generator)
        setattr(parent, attr, adapted)
        params += [adapted.lora_A.weight, adapted.lora_B.weight]
    return params


def lora_param_count(spec: ModelSpec, rank: int, targets: Iterable[str] = ("q_proj", "v_proj")) -> int:
    """Adapter parameters ``apply_lora`` adds to the whole model: ``rank * (in + out)`` per adapted
    linear layer."""
    h, kv, i = spec.hidden_size, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    per_layer = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    total = 0
    for t in targets:
        if t in per_layer:
            total += spec.num_layers * rank * sum(per_layer[t])
        elif t == "lm_head":
            total += rank * (h + spec.vocab_size)
        else:
            raise ValueError(f"LoRA target '{t}' is not a linear layer of the model; known: "
                             f"{sorted([*per_layer, 'lm_head'])}")
    return total
