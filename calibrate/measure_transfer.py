"""Data movement (``transfer``): copies between device memory, host memory and other devices.

Links measured: on CUDA ``d2d`` (within the device's memory), ``h2d`` and ``d2h`` (pinned host memory,
asynchronous copies as a KV swap or an offload does) and ``p2p`` (to a second visible GPU, if any;
NVLink or PCIe, whichever connects them); on the CPU ``host`` (a copy within host memory).

Payloads:

* ``flat``: one contiguous buffer of ``size`` bytes (the bandwidth curve);
* ``kv``: one sequence's KV cache of ``size`` tokens, stored per layer as separate K and V tensors of
  ``[kv_heads, tokens, head_dim]`` and copied tensor by tensor (a KV transfer between a prefill and a
  decode instance); ``bytes = size * kv_bytes_per_token`` in the calibration dtype;
* ``weights``: the parameters of ``size`` decoder layers, copied tensor by tensor (a weight sync from a
  training to a serving replica; scale by layers for a whole model).
"""
from __future__ import annotations

from typing import Any

import torch

from calibrate.context import Context
from calibrate.grids import axis


def links(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["host"]
    out = ["d2d", "h2d", "d2h"]
    if torch.cuda.device_count() > 1:
        out.append("p2p")
    return out


class TransferMeasurer:
    table = "transfer"

    def __init__(self, ctx: Context, grid: dict, where: str):
        self.ctx = ctx
        self.bytes = axis(grid, where, "bytes")
        self.kv_tokens = axis(grid, where, "kv_tokens")
        self.weight_layers = [n for n in axis(grid, where, "weight_layers") if n <= ctx.spec.num_layers]
        self.links = links(ctx.device)

    def points(self) -> list[dict[str, Any]]:
        pts = []
        for link in self.links:
            pts += [{"link": link, "payload": "flat", "size": n} for n in self.bytes]
            pts += [{"link": link, "payload": "kv", "size": n} for n in self.kv_tokens]
            pts += [{"link": link, "payload": "weights", "size": n} for n in self.weight_layers]
        return pts

    def _shapes(self, p: dict[str, Any]) -> list[tuple[int, ...]]:
        spec = self.ctx.spec
        if p["payload"] == "flat":
            return [(p["size"],)]
        if p["payload"] == "kv":
            return [(spec.num_kv_heads, p["size"], spec.head_dim)] * (2 * spec.num_layers)
        return layer_shapes(spec) * p["size"]

    def _dtype(self, p: dict[str, Any]) -> torch.dtype:
        return torch.uint8 if p["payload"] == "flat" else self.ctx.dtype

    def estimate_bytes(self, p: dict[str, Any]) -> int:
        elem = torch.empty((), dtype=self._dtype(p)).element_size()
        return 2 * elem * sum(_numel(s) for s in self._shapes(p))

    def measure(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        ctx, link = self.ctx, p["link"]
        dtype, shapes = self._dtype(p), self._shapes(p)
        src_dev, dst_dev = _endpoints(ctx.device, link)
        pin = ctx.device.type == "cuda"
        src = [_alloc(s, dtype, src_dev, pin) for s in shapes]
        dst = [_alloc(s, dtype, dst_dev, pin) for s in shapes]
        for t in src:
            t.zero_()

        def copy():
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)

        timing = ctx.timer(copy)
        nbytes = sum(t.numel() * t.element_size() for t in src)
        return [{"link": link, "payload": p["payload"], "size": p["size"], "bytes": nbytes,
                 "num_tensors": len(src), "latency_s": timing.median_s, "latency_std_s": timing.std_s,
                 "repeats": timing.repeats, "bandwidth_bytes_per_s": nbytes / timing.median_s}]

    def close(self) -> None:
        pass


def layer_shapes(spec) -> list[tuple[int, ...]]:
    """Parameter shapes of one Llama decoder layer (q, k, v, o, gate, up, down, two RMSNorms)."""
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    if spec.qkv_bias:
        shapes += [(h,), (kv,), (kv,)]
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _endpoints(device: torch.device, link: str) -> tuple[torch.device, torch.device]:
    cpu = torch.device("cpu")
    return {"host": (cpu, cpu), "d2d": (device, device), "h2d": (cpu, device), "d2h": (device, cpu),
            "p2p": (device, torch.device("cuda", 1 if (device.index or 0) == 0 else 0))}[link]


def _alloc(shape, dtype, device: torch.device, pin: bool) -> torch.Tensor:
    if device.type == "cpu":
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    return torch.empty(shape, dtype=dtype, device=device)
