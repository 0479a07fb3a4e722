"""Analytical roofline cost tables, for GPU × model × tensor-parallel degrees nobody has measured.

An iteration is a sum of kernels (they run one after another). Each throughput-bound part costs
``smooth_max(FLOPs / (peak · eff), bytes / (HBM bandwidth · eff))`` -- ``(C^n + M^n)^(1/n)``, which bends
through the compute/memory ridge the way measured GEMMs do instead of taking the sharp corner of
``max`` -- and kernel floors, a fixed per-iteration overhead and the tensor-parallel all-reduces are added.
Per GPU of a TP group:

* linear layers: ``2 · P_layers / tp`` FLOPs per token (``P_layers``: all decoder-layer parameters,
  i.e. the non-embedding parameters without the LM head) at ``gemm_efficiency``; their weights are read once
  per iteration at ``memory_efficiency``;
* LM head: ``2 · hidden · vocab / tp`` FLOPs per *sequence* (engines compute logits of the last token
  only); its weight is read once per iteration. The input embedding is a gather of a few rows, not a
  read of the table, so it is not costed;
* prefill attention, causal, for a sequence of ``s`` tokens: ``2 · L · s² · hidden / tp`` FLOPs (QKᵀ and
  PV are ``2 · s² · hidden`` each, halved by the mask) at an efficiency that grows with the length,
  ``attention_efficiency · s / (s + attention_half_len)``; the batch's tokens are assumed split evenly over
  its sequences (``s = batch_tokens / num_seqs``); its memory traffic is the prompt's K and V;
* decode attention: ``4 · L · kv · hidden / tp`` FLOPs and ``kv · kv_bytes_per_token / tp`` bytes per
  sequence with ``kv`` KV-cache tokens;
* attention floors (prefill and decode): per layer ``attention_kernel_s`` plus ``attention_per_seq_head_s``
  per sequence and query head on the GPU -- a fixed cost per layer and a cost per sequence even at short
  contexts;
* element-wise kernels of every layer (two RMSNorms with fused residual add, rotary embedding,
  SiLU-and-mul, residual add; bytes in :func:`elementwise_bytes_per_token`): each the larger of
  ``elementwise_kernel_s`` and its bytes at ``elementwise_efficiency``;
* tensor parallelism: 2 all-reduces per layer of ``tokens · hidden · dtype_bytes`` bytes, costed as a
  ring: ``2(tp-1)/tp · bytes / (NVLink bandwidth · eff) + latency``.

Every parameter is fitted to or read from public measurements, cited in :class:`RooflineParams`;
``python -m simcolo.costs.roofline --check`` prints the distance to them (``simcolo/costs/evidence``).

Every directory also gets the training tables ``train_stage`` and ``lora_step`` and the co-run
``interference`` table, estimated by the formulas in ``roofline_training.py``.

Activations' memory traffic beyond the element-wise kernels is ignored. The tables are labelled
``source: roofline`` and are meant to be replaced by measured tables from calibrate/.

CLI::

    python -m simcolo.costs.roofline --gpu h100-sxm --model llama3-8b --tp 1 --out DIR
    python -m simcolo.costs.roofline --all            # regenerate every shipped directory
    python -m simcolo.costs.roofline --check          # distance to the public measurements
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from simcolo.costs.schema import (DECODE, METADATA_FILE, PREFILL, SCHEMA_VERSION, parse_table_dir_name,
                                  table_dir_name)
from simcolo.costs.tables import grid_csv, write_table_dir
from simcolo.errors import ConfigError, SimcoloError
from simcolo.paths import TABLES_DIR
from simcolo.specs import GPUSpec, ModelSpec, known_gpus, known_models, load_gpu_spec, load_model_spec

#: Bump when the formulas, defaults or grids change; ``GENERATOR_DATE`` is written as ``created`` so
#: that regenerating gives byte-identical files (the tests compare them with the shipped ones).
GENERATOR_VERSION = 4
GENERATOR_DATE = "2026-12-02"
GENERATOR = f"simcolo.costs.roofline v{GENERATOR_VERSION}"

TP_DEGREES = (1, 2, 4, 8)
#: A model's weights (per GPU) may take at most this share of GPU memory for the table to be shipped;
#: the rest is the least a serving engine needs for KV cache and activations.
MAX_WEIGHT_SHARE = 0.9
#: Models that exist for tests only get tp1 tables.
TEST_MODELS = ("tiny",)

DTYPE_NAMES = {1: "float8", 2: "bfloat16", 4: "float32"}


@dataclass(frozen=True)
class RooflineParams:
    """The roofline's parameters, each from a public measurement (cited beside it). Efficiencies are the
    achieved fraction of a datasheet peak (``conf/gpu``); times are seconds.

    Evidence files (``simcolo/costs/evidence/``, see its README): ``vidur_h100_llama2_7b_layer.csv`` (Vidur's
    H100 operator profile of a Llama-2-7B layer, tp1: medians in ms of every GEMM and element-wise kernel at
    1..4096 tokens; microsoft/vidur, data/profiling/compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv, MIT),
    ``vidur_a100_decode_attention.csv`` (Vidur's A100 decode-attention profile, 32 query / 4 KV heads per
    GPU, KV 32 tokens; data/profiling/a100/attention.csv, MIT) and ``fa2_h100_causal_hdim128.csv``
    (FlashAttention-2 forward, causal, head dim 128 on H100 SXM5, TFLOP/s by sequence length: Shah et al.,
    FlashAttention-3, arXiv 2407.08608, Fig. 5). ``python -m simcolo.costs.roofline --check`` prints the
    roofline's distance to each of them.
    """

    gemm_efficiency: float = 0.78
    """Fraction of dense BF16 peak that the linear layers' GEMMs reach once compute-bound. Vidur's H100
    profile: the four GEMMs of a Llama-2-7B layer at 4096 tokens take 2.205 ms for 1.66 TFLOP, 752 TFLOP/s =
    0.76 of 989; fitted with ``ridge_sharpness`` over 1..4096 tokens, 0.78."""

    memory_efficiency: float = 0.8
    """Fraction of HBM peak bandwidth that weight and KV streaming reach. Vidur's H100 profile: the
    one-token GEMVs of a Llama-2-7B layer read 405 MB in 0.156 ms, 0.77 of 3.35 TB/s (0.84 for the largest,
    mlp_up_proj)."""

    ridge_sharpness: float = 1.4
    """How sharply a GEMM turns from memory- to compute-bound: a kernel with compute time ``C`` and memory
    time ``M`` takes ``(C^n + M^n)^(1/n)`` (``n`` -> infinity is the sharp ``max(C, M)``; 1 is their sum).
    Near the ridge the two overlap badly: Vidur's H100 Llama-2-7B GEMMs at 256 and 512 tokens take 1.7x
    and 1.2x the larger of the two. Fitted over the profile's 1..4096 tokens (with ``gemm_efficiency``):
    1.4, every point within 10 %."""

    attention_efficiency: float = 0.34
    """Fraction of BF16 peak that attention reaches on long sequences: FlashAttention-2 forward, causal,
    head dim 128 on H100 SXM5 plateaus at 335 TFLOP/s = 0.34 of 989 (FlashAttention-3 paper, Fig. 5)."""

    attention_half_len: float = 380.0
    """Sequence length (tokens) at which attention reaches half of ``attention_efficiency``: its efficiency
    at ``s`` tokens is ``attention_efficiency * s / (s + attention_half_len)``. Fitted to the same figure
    (191, 260, 298, 319 TFLOP/s at 512, 1k, 2k, 4k tokens: short prefills reach a small fraction of peak)."""

    attention_kernel_s: float = 12e-6
    """Fixed time of one attention kernel (per layer and iteration, prefill or decode): launch, the split-KV
    reduction and the tail of a small grid. Vidur's A100 decode attention takes 12-15 us per layer at batch
    1-32 with 32 KV tokens, where the KV read is ~1 us."""

    attention_per_seq_head_s: float = 1.0e-9
    """Time per sequence and per query head on the GPU (per layer) of an attention kernel beyond its FLOPs and
    bytes: each (sequence, head) is a thread block with its own prologue and softmax reduction. Vidur's
    A100 decode attention grows from 12 us (batch 32) to 20 us (batch 80) at 32 KV tokens with 32 query heads
    per GPU; with ``attention_kernel_s`` fitted to the five measured batches (1, 8, 32, 64, 80): each within
    20 % (the measurement itself is not monotone in the batch: 15 us at batch 1, 12 us at 8 and 32)."""

    elementwise_efficiency: float = 0.6
    """Fraction of HBM peak bandwidth that the element-wise kernels (RMSNorm with fused residual add, rotary
    embedding, SiLU-and-mul, residual add) reach on large batches. Vidur's H100 profile at 4096 tokens: norm
    0.067 ms for 134 MB (0.60), activation 0.139 ms for 270 MB (0.58), rotary 0.084 ms for 134 MB (0.48)."""

    elementwise_kernel_s: float = 4e-6
    """Least time of one element-wise kernel (launch and a grid too small to fill the GPU). Vidur's H100
    profile: norm and rotary 4 us, activation 6 us at 1 token (a layer's five element-wise kernels 19 us)."""

    iteration_overhead_s: float = 1.5e-3
    """Fixed time per iteration: CPU-side scheduling, input preparation, sampling and output
    processing, plus kernel/graph launches. vLLM-class engines spend ~1-2 ms per step on these even
    with CUDA graphs; Vidur's CPU-overhead profile (data/profiling/*/cpu_overheads.csv) models the same
    costs (schedule, prepare inputs, sampler, process outputs) per step."""

    allreduce_latency_s: float = 10e-6
    """Fixed latency per tensor-parallel all-reduce (launch + synchronisation). NCCL and vLLM's custom
    all-reduce take ~5-15 us for small messages over NVLink."""

    interconnect_efficiency: float = 0.8
    """Fraction of the one-directional NVLink bandwidth that a ring all-reduce reaches (NCCL bus
    bandwidth is ~75-85 % of the link peak for large messages)."""

    train_phase_overhead_s: float = 0.3e-3
    """Fixed time added to each training phase of the ``train_stage`` and ``lora_step`` tables (one
    forward, one backward or one optimizer step of a micro-batch): autograd and Python dispatch plus
    the launch gaps of the few hundred kernels a phase runs that are not hidden behind GPU work.
    Eager PyTorch training steps show ~0.1-0.5 ms of such gaps per phase once the GPU is busy; 0.3 ms
    sits there. See ``simcolo/costs/roofline_training.py``."""

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0 or (f.name.endswith("efficiency") and value > 1):
                raise ConfigError(f"roofline parameter {f.name} = {value!r} must be > 0"
                                  + (" and <= 1" if f.name.endswith("efficiency") else ""))
        if self.ridge_sharpness < 1:
            raise ConfigError(f"roofline parameter ridge_sharpness = {self.ridge_sharpness!r} must be >= 1 "
                              "(1: compute and memory time add up; larger: closer to their maximum)")


def smooth_max(compute_s: float, memory_s: float, sharpness: float) -> float:
    """``(C^n + M^n)^(1/n)``: the time of a kernel that needs ``compute_s`` at its compute roof and
    ``memory_s`` at its memory roof, bending smoothly through the ridge (``RooflineParams.ridge_sharpness``).
    Exact at the ends: a kernel with no compute (or no memory traffic) takes the other time."""
    if compute_s <= 0.0:
        return memory_s
    if memory_s <= 0.0:
        return compute_s
    hi, lo = (compute_s, memory_s) if compute_s >= memory_s else (memory_s, compute_s)
    return hi * (1.0 + (lo / hi) ** sharpness) ** (1.0 / sharpness)   # scaled: no underflow for large n


@dataclass(frozen=True)
class KernelCost:
    """One kernel sequence (an iteration, a training phase), costed by the roofline.

    ``parts`` are (compute s, memory s) pairs, each costing :func:`smooth_max` of the two; ``busy_s`` is GPU
    time that is neither (kernel floors: attention launches and per-sequence blocks); ``fixed_s`` is time the
    GPU does not work for it (CPU overheads, all-reduce latency). The co-run interference model reads the
    shares of each (:meth:`profile`)."""

    parts: tuple[tuple[float, float], ...]
    busy_s: float
    fixed_s: float
    sharpness: float

    @property
    def total_s(self) -> float:
        t = 0.0
        for c, m in self.parts:
            t += smooth_max(c, m, self.sharpness)
        return t + self.busy_s + self.fixed_s

    def __add__(self, other: "KernelCost") -> "KernelCost":
        return KernelCost(self.parts + other.parts, self.busy_s + other.busy_s, self.fixed_s + other.fixed_s,
                          self.sharpness)

    def profile(self) -> "KernelProfile":
        total = self.total_s
        return KernelProfile(sum(c for c, _ in self.parts) / total, sum(m for _, m in self.parts) / total,
                             (total - self.fixed_s) / total)


@dataclass(frozen=True)
class KernelProfile:
    """Shares of a kernel sequence's solo time: compute ``c``, memory ``m`` (each at its roof) and ``g``, the
    share during which the GPU runs its kernels (holds SMs); ``o = 1 - max(c, m)`` is the rest."""

    c: float
    m: float
    g: float = 1.0

    @property
    def o(self) -> float:
        return 1.0 - max(self.c, self.m)


def elementwise_bytes_per_token(model: ModelSpec, tp: int) -> tuple[int, ...]:
    """HBM bytes per token of each element-wise kernel of one decoder layer on one GPU of a TP group:
    the two RMSNorms with their fused residual add (read x and residual, write both: ``4 h``; replicated
    on every rank), rotary embedding of the local Q and K heads (read and write: ``2 (h + kv) / tp``),
    SiLU-and-mul (read gate and up, write: ``3 i / tp``) and the residual add (``3 h``), times dtype bytes."""
    h, kv, i, b = model.hidden_size, model.num_kv_heads * model.head_dim, model.intermediate_size, model.dtype_bytes
    return (4 * h * b, 4 * h * b, 2 * (h + kv) * b // tp, 3 * i * b // tp, 3 * h * b)


def check_tp(model: ModelSpec, tp: int) -> None:
    """Tensor parallelism splits attention heads and KV heads evenly over the GPUs."""
    if tp < 1 or model.num_attention_heads % tp or model.num_kv_heads % tp:
        raise ConfigError(f"tp={tp} does not divide {model.name}'s {model.num_attention_heads} attention "
                          f"heads and {model.num_kv_heads} KV heads")


class Roofline:
    """Iteration latencies of ``model`` on a TP group of ``tp`` ``gpu``s (pure Python floats, so the
    results are the same on every machine)."""

    def __init__(self, model: ModelSpec, gpu: GPUSpec, tp: int, params: RooflineParams = RooflineParams()):
        check_tp(model, tp)
        params.validate()
        self.model, self.gpu, self.tp, self.params = model, gpu, tp, params
        m, p = model, params
        layer_params = m.num_layers * m.layer_params
        self._linear_flops_per_token = 2.0 * layer_params / tp
        self._linear_bytes = layer_params * m.dtype_bytes / tp
        self._head_flops_per_seq = 2.0 * m.hidden_size * m.vocab_size / tp
        self._head_bytes = m.hidden_size * m.vocab_size * m.dtype_bytes / tp
        self._kv_bytes_per_token = m.kv_bytes_per_token / tp
        self._gemm_flops = gpu.peak_bf16_flops * p.gemm_efficiency
        self._peak = gpu.peak_bf16_flops
        self._mem_bw = gpu.hbm_bandwidth_bytes_per_s * p.memory_efficiency
        self._ew_bw = gpu.hbm_bandwidth_bytes_per_s * p.elementwise_efficiency
        self._ew_bytes = elementwise_bytes_per_token(m, tp)
        self._heads = m.num_attention_heads // tp
        self._link_bw = gpu.nvlink_bandwidth_bytes_per_s * p.interconnect_efficiency

    def attention_efficiency(self, seq_len: float) -> float:
        """Achieved fraction of peak of attention over sequences of ``seq_len`` tokens."""
        p = self.params
        return p.attention_efficiency * seq_len / (seq_len + p.attention_half_len)

    def elementwise_s(self, tokens: float, layers: int | None = None) -> float:
        """The element-wise kernels of ``layers`` layers (default: all) for ``tokens`` tokens: each kernel the
        larger of its floor and its bytes at ``elementwise_efficiency``."""
        floor, per_layer = self.params.elementwise_kernel_s, 0.0
        for nbytes in self._ew_bytes:
            t = tokens * nbytes / self._ew_bw
            per_layer += t if t > floor else floor
        return (self.model.num_layers if layers is None else layers) * per_layer

    def attention_floor_s(self, num_seqs: float, layers: int | None = None) -> float:
        """Kernel floors of the attention of ``layers`` layers (default: all): one launch per layer plus one
        block per sequence and query head."""
        p = self.params
        return ((self.model.num_layers if layers is None else layers)
                * (p.attention_kernel_s + p.attention_per_seq_head_s * num_seqs * self._heads))

    def _allreduce_s(self, tokens: float) -> float:
        tp = self.tp
        if tp == 1:
            return 0.0
        nbytes = tokens * self.model.hidden_size * self.model.dtype_bytes
        one = 2.0 * (tp - 1) / tp * nbytes / self._link_bw + self.params.allreduce_latency_s
        return 2 * self.model.num_layers * one

    def prefill_cost(self, batch_tokens: int, num_seqs: int) -> KernelCost:
        """A prefill iteration of ``batch_tokens`` prompt tokens in ``num_seqs`` equal sequences: linear layers,
        LM head and attention (compute, memory), element-wise kernels (memory), attention floors (busy), the
        iteration overhead and all-reduces (fixed)."""
        L, h = self.model.num_layers, self.model.hidden_size
        seq_len = batch_tokens / num_seqs
        attn_flops = 2.0 * L * batch_tokens * seq_len * h / self.tp
        parts = (
            (self._linear_flops_per_token * batch_tokens / self._gemm_flops, self._linear_bytes / self._mem_bw),
            (self._head_flops_per_seq * num_seqs / self._gemm_flops, self._head_bytes / self._mem_bw),
            (attn_flops / (self._peak * self.attention_efficiency(seq_len)),
             batch_tokens * self._kv_bytes_per_token / self._mem_bw),
            (0.0, self.elementwise_s(batch_tokens)),
        )
        return KernelCost(parts, self.attention_floor_s(num_seqs),
                          self.params.iteration_overhead_s + self._allreduce_s(batch_tokens),
                          self.params.ridge_sharpness)

    def prefill_s(self, batch_tokens: int, num_seqs: int) -> float:
        """A prefill iteration of ``batch_tokens`` prompt tokens in ``num_seqs`` equal sequences. Also
        evaluated for ``num_seqs > batch_tokens`` (sequences shorter than one token), which only exists
        to keep the table a full grid."""
        return self.prefill_cost(batch_tokens, num_seqs).total_s

    def decode_cost(self, batch_size: int, kv_tokens_per_seq: int) -> KernelCost:
        """A decode iteration of ``batch_size`` sequences, each attending to ``kv_tokens_per_seq`` tokens
        (parts as :meth:`prefill_cost`; attention compute at the long-sequence ``attention_efficiency``, it is
        memory-bound anyway)."""
        L, h = self.model.num_layers, self.model.hidden_size
        kv_total = batch_size * kv_tokens_per_seq
        parts = (
            (self._linear_flops_per_token * batch_size / self._gemm_flops, self._linear_bytes / self._mem_bw),
            (self._head_flops_per_seq * batch_size / self._gemm_flops, self._head_bytes / self._mem_bw),
            (4.0 * L * kv_total * h / self.tp / (self._peak * self.params.attention_efficiency),
             kv_total * self._kv_bytes_per_token / self._mem_bw),
            (0.0, self.elementwise_s(batch_size)),
        )
        return KernelCost(parts, self.attention_floor_s(batch_size),
                          self.params.iteration_overhead_s + self._allreduce_s(batch_size),
                          self.params.ridge_sharpness)

    def decode_s(self, batch_size: int, kv_tokens_per_seq: int) -> float:
        """A decode iteration of ``batch_size`` sequences, each attending to ``kv_tokens_per_seq`` tokens."""
        return self.decode_cost(batch_size, kv_tokens_per_seq).total_s


# ----------------------------------------------------------------------------------------- grids

def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


def prefill_grid(model: ModelSpec) -> tuple[list[int], list[int]]:
    """``batch_tokens``: powers of two from 1 to max(16384, max_context_len), plus max_context_len
    (real prompts can be a few tokens long); ``num_seqs``: 1, 2, 4, ..., 256."""
    top = max(16384, model.max_context_len)
    tokens = sorted(set(_powers_of_two(1, top)) | {model.max_context_len})
    return tokens, _powers_of_two(1, 256)


def decode_grid(model: ModelSpec) -> tuple[list[int], list[int]]:
    """``batch_size``: 1, 2, ..., 512; ``kv_tokens_per_seq``: powers of two from 1 up to the
    model's max_context_len, plus max_context_len itself."""
    kv = sorted(set(_powers_of_two(1, model.max_context_len)) | {model.max_context_len})
    return _powers_of_two(1, 512), kv


# ----------------------------------------------------------------------------------------- generation

#: Specs in conf/gpu that are not GPUs (``cpu`` lets the simulator run on CPU-measured tables); no
#: roofline tables are shipped for them.
STAND_IN_GPUS = ("cpu",)


def shippable_configs() -> list[tuple[str, str, int]]:
    """Every (gpu, model, tp) the project ships roofline tables for: the weights per GPU fit in
    MAX_WEIGHT_SHARE of its memory and tp divides the attention and KV heads; test models tp1 only."""
    out = []
    for gpu_name in known_gpus():
        if gpu_name in STAND_IN_GPUS:
            continue
        gpu = load_gpu_spec(gpu_name)
        for model_name in known_models():
            model = load_model_spec(model_name)
            for tp in TP_DEGREES:
                if model_name in TEST_MODELS and tp != 1:
                    continue
                if model.num_attention_heads % tp or model.num_kv_heads % tp:
                    continue
                if model.weight_bytes / tp > MAX_WEIGHT_SHARE * gpu.memory_bytes:
                    continue
                out.append((gpu_name, model_name, tp))
    return out


def _method_text(params: RooflineParams) -> str:
    p = params
    return (f"Analytical roofline ({GENERATOR}), not a measurement; parameters from public measurements (see "
            f"roofline_params and RooflineParams in simcolo/costs/roofline.py). Each part of an iteration costs "
            f"(C^n + M^n)^(1/n), n = {p.ridge_sharpness}, of its compute time C = FLOPs / (peak * eff) and memory "
            f"time M = bytes / (HBM bandwidth * {p.memory_efficiency}); parts are summed. Linear layers: 2 * "
            f"decoder-layer params / tp FLOPs per token, eff {p.gemm_efficiency}, weights read once per "
            f"iteration. LM head: 2 * hidden * vocab / tp FLOPs per sequence. Prefill attention: 2 * layers * "
            f"s^2 * hidden / tp FLOPs per sequence of s = batch_tokens / num_seqs tokens (also evaluated for "
            f"num_seqs > batch_tokens to keep the grid rectangular), eff {p.attention_efficiency} * s / (s + "
            f"{p.attention_half_len}). Decode attention: reads kv tokens * kv_bytes_per_token / tp. Attention "
            f"floors per layer: {p.attention_kernel_s} s + {p.attention_per_seq_head_s} s per sequence and "
            f"query head on the GPU. Element-wise kernels (2 RMSNorms with residual add, rotary, SiLU-and-mul, "
            f"residual add) per layer: each max({p.elementwise_kernel_s} s, bytes / (HBM bandwidth * "
            f"{p.elementwise_efficiency})). Plus {p.iteration_overhead_s} s per iteration and, for tp > 1, "
            f"2 ring all-reduces per layer (2(tp-1)/tp * tokens * hidden * dtype_bytes / (NVLink * "
            f"{p.interconnect_efficiency}) + {p.allreduce_latency_s} s).")


def generate(gpu: str, model: str, tp: int, out: Path, params: RooflineParams = RooflineParams()) -> Path:
    """Write the roofline table directory for ``gpu``/``model``/``tp`` to ``out``; returns ``out``.

    Besides ``prefill`` and ``decode`` it holds ``interference`` and, for tp 1 only, ``train_stage`` and
    ``lora_step`` (``simcolo/costs/roofline_training.py``): training stages are single GPUs, and the
    simulator reads training tables from the tp1 directory whatever the serving tp (it keeps the
    shipped tables small)."""
    from simcolo.costs import roofline_training  # it imports this module

    model_spec, gpu_spec = load_model_spec(model), load_gpu_spec(gpu)
    roof = Roofline(model_spec, gpu_spec, tp, params)
    tokens, seqs = prefill_grid(model_spec)
    batches, kvs = decode_grid(model_spec)
    prefill_rows = [(t, n, roof.prefill_s(t, n)) for t in tokens for n in seqs]
    decode_rows = [(b, k, roof.decode_s(b, k)) for b in batches for k in kvs]
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "source": "roofline",
        "gpu": gpu,
        "model": model,
        "tp": tp,
        "dtype": DTYPE_NAMES.get(model_spec.dtype_bytes, f"{model_spec.dtype_bytes}-byte"),
        "created": GENERATOR_DATE,
        "generator": GENERATOR,
        "model_config": asdict(model_spec),
        "gpu_spec": asdict(gpu_spec),
        "method": _method_text(params) + " " + roofline_training.method_text(params),
        "roofline_params": asdict(params),
        "tables": {"prefill": "prefill.csv", "decode": "decode.csv", **roofline_training.files_for(tp)},
    }
    files = {"prefill.csv": grid_csv(PREFILL, prefill_rows), "decode.csv": grid_csv(DECODE, decode_rows),
             **roofline_training.training_tables(model_spec, gpu_spec, tp, params)}
    write_table_dir(out, metadata, files)
    return Path(out)


def _source_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / METADATA_FILE).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def generate_all(root: Path = TABLES_DIR, params: RooflineParams = RooflineParams(),
                 force: bool = False) -> list[Path]:
    """(Re)generate every shippable directory under ``root``; measured tables are kept unless ``force``."""
    written = []
    for gpu, model, tp in shippable_configs():
        out = Path(root) / table_dir_name(gpu, model, tp)
        if not force and _source_of(out) == "measured":
            print(f"kept measured tables in {out}", file=sys.stderr)
            continue
        written.append(generate(gpu, model, tp, out, params))
    wanted = {table_dir_name(*c) for c in shippable_configs()}
    stale = [d for d in sorted(Path(root).iterdir()) if d.is_dir() and parse_table_dir_name(d.name)
             and d.name not in wanted and _source_of(d) == "roofline"]
    for d in stale:
        print(f"note: {d} holds roofline tables for a configuration no longer shipped; delete it "
              "if it is stale", file=sys.stderr)
    return written


def _parse_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    known = [f.name for f in fields(RooflineParams)]
    if not sep or name not in known:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {known}, got {text!r}")
    return name, float(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simcolo.costs.roofline", description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", help=f"one of {known_gpus()}")
    ap.add_argument("--model", help=f"one of {known_models()}")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", type=Path, help="directory to write (with --all: the root holding the "
                    f"<gpu>__<model>__tp<N> directories); default under {TABLES_DIR}")
    ap.add_argument("--all", action="store_true", help="regenerate every shipped configuration")
    ap.add_argument("--param", action="append", type=_parse_param, default=[], metavar="NAME=VALUE",
                    help="override a RooflineParams field (repeatable)")
    ap.add_argument("--force", action="store_true", help="overwrite measured tables too")
    ap.add_argument("--check", action="store_true", help="print the roofline's distance to the public "
                    "measurements its parameters come from (simcolo/costs/evidence) and exit")
    args = ap.parse_args(argv)
    params = replace(RooflineParams(), **dict(args.param))
    try:
        if args.check:
            from simcolo.costs.roofline_check import checks, format_checks

            params.validate()
            print(format_checks(checks(params)))
            return 0
        if args.all:
            if args.gpu or args.model:
                ap.error("--all regenerates every configuration; drop --gpu/--model")
            written = generate_all(args.out or TABLES_DIR, params, args.force)
            print(f"wrote {len(written)} table directories under {args.out or TABLES_DIR}")
            return 0
        if not (args.gpu and args.model):
            ap.error("give --gpu and --model (and --tp), or --all")
        out = args.out or TABLES_DIR / table_dir_name(args.gpu, args.model, args.tp)
        if not args.force and _source_of(out) == "measured":
            raise ConfigError(f"{out} holds measured tables; pass --force to overwrite them")
        generate(args.gpu, args.model, args.tp, out, params)
        print(f"wrote {out}")
        return 0
    except SimcoloError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
