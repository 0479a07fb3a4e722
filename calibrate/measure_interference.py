"""Co-run interference (``interference``): an inference iteration (side a: ``prefill`` or ``decode``)
running beside training work (side b: ``train``, forward + backward of the first pipeline stage of
``num_stages``, or ``lora``, forward + backward of the whole model with LoRA adapters) on one GPU.

Each side is a callable that launches one iteration. A measurement:

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
* MPS active-thread percentages need one process per side and a running MPS daemon; calibrate does
  not drive those, and says so in the metadata.

Without CUDA nothing is measured and the metadata says ``interference_method: "unavailable: no CUDA
device"``.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

from calibrate.context import Context
from calibrate.grids import axis, scalar
from simcolo.errors import ConfigError

MPS_NOTE = ("MPS not used: active-thread percentages need one process per side and a running MPS "
            "control daemon")


# --------------------------------------------------------------------------------- green contexts

class GreenPartition:
    """Two streams on disjoint SM groups of one GPU, made with CUDA green contexts (cuda-bindings)."""

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


def describe_method(device: torch.device) -> tuple[str, str, list[str]]:
    """(``interference_method`` for the metadata, a note with the reasons, methods to measure)."""
    if device.type != "cuda":
        return "unavailable: no CUDA device", "no CUDA device: co-run interference needs a GPU", []
    why = green_context_status(device)
    if why is None:
        return "green_context", f"green contexts via cuda-bindings, plus plain streams; {MPS_NOTE}", \
            ["streams", "green_context"]
    return "streams", f"green contexts unavailable: {why}; {MPS_NOTE}", ["streams"]


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

    def points(self) -> list[dict[str, Any]]:
        pts = []
        for kind_a in ("prefill", "decode"):
            for a in self.shapes[kind_a]:
                for kind_b in self.kinds_b:
                    for b in self.shapes[kind_b]:
                        base = {"kind_a": kind_a, "a_x": a[0], "a_y": a[1], "kind_b": kind_b,
                                "b_micro_batch": b[0], "b_seq_len": b[1]}
                        if "streams" in self.methods:
                            pts.append({**base, "method": "streams", "sm_share_a": 1.0})
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

    # ------------------------------------------------------------------ sides

    def _model(self, key, build):
        if key not in self._models:
            self._models[key] = build()
        return self._models[key]

    def _side_a(self, p: dict[str, Any]) -> Callable[[], None]:
        from calibrate.model import KVCache, build_model

        ctx = self.ctx
        spec = ctx.spec_for_length(self.serving_len)
        model = self._model("full",
                            lambda: build_model(spec, device=ctx.device, dtype=ctx.dtype, seed=ctx.seed).eval())
        if p["kind_a"] == "prefill":
            n = p["a_y"]
            ids = ctx.random_ids((n, p["a_x"] // n), salt=30)
            cache = KVCache(ctx.spec, n, p["a_x"] // n, device=ctx.device, dtype=ctx.dtype)
            length = 0
        else:
            batch, length = p["a_x"], p["a_y"]
            ids = ctx.random_ids((batch, 1), salt=31)
            cache = KVCache.filled(ctx.spec, batch, length, length + 1, device=ctx.device, dtype=ctx.dtype,
                                   generator=ctx.generator(32))

        @torch.inference_mode()
        def step():
            cache.length = length
            model(ids, cache, last_token_logits_only=True)

        return step

    def _side_b(self, p: dict[str, Any]) -> Callable[[], None]:
        from calibrate.lora import apply_lora
        from calibrate.model import build_model, stage_layers

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
