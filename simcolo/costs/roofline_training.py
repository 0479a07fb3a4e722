"""Roofline estimates of the training tables (``train_stage``, ``lora_step``) and of co-run
``interference``, written by the roofline generator next to ``prefill``/``decode`` with the columns and
meaning calibrate/ gives them (``schema.RESERVED_COLUMNS``, FORMAT.md).

Everything is pure Python floats (integers for parameter and byte counts), so the files are the same
on every machine. ``peak`` is the GPU's dense BF16 peak, ``bw`` its HBM bandwidth, ``ge``/``me``
the ``RooflineParams`` GEMM and memory efficiencies, ``ae(s)`` the length-dependent attention efficiency
(``Roofline.attention_efficiency``), ``b`` the bytes per element of the model's dtype, ``h`` hidden size,
``i`` intermediate size, ``V`` vocabulary, ``kv`` = KV heads x head dim. A *part* costs
``smooth_max(compute time, memory time)`` (``roofline.smooth_max``) and the parts of a phase add up
(their kernels run one after another), plus the attention floors (``Roofline.attention_floor_s``) and
``train_phase_overhead_s`` once per phase.

``train_stage`` (full-parameter training with AdamW, one pipeline stage on **one GPU**: the stage GPUs
are tp=1 even in a ``tpN`` directory -- the table is written into every directory, computed for tp=1)

* stage split as ``schema.stage_layers`` (the engine's stage models use it): contiguous, the first
  ``L % S`` stages one layer more; stage 0 holds the embedding, stage ``S - 1`` the final norm and LM
  head (a stage of a 1-stage split holds both);
* grid: ``num_stages`` in {1, 2, 4, 8} (those <= the model's layers), every ``stage``, ``micro_batch``
  in {1, 2, 4, 8, 16}, ``seq_len`` in {128, ..., 4096} up to ``max_context_len`` (plus
  ``max_context_len`` itself when it is below 4096); phases ``forward``, ``backward``, ``optimizer``;
* forward, for ``T = micro_batch * seq_len`` tokens and ``L_s`` layers of ``P_layer`` parameters:
  linear layers ``2 * L_s * P_layer * T`` FLOPs at ``ge`` against the stage's layer weights read once
  (``L_s * P_layer * b`` bytes); causal attention ``2 * L_s * micro_batch * seq_len^2 * h`` FLOPs at
  ``ae(seq_len)`` against the K and V of the tokens (``L_s * T * 2 * kv * b`` bytes) plus its floors for
  ``micro_batch`` sequences; the element-wise kernels of ``L_s`` layers for ``T`` tokens
  (``Roofline.elementwise_s``); on the last stage the LM
  head, ``2 * h * V * T`` FLOPs against ``h * V * b`` bytes. The embedding is a gather: free. Other
  activation traffic is ignored (small next to the weights while memory-bound, hidden once the GEMMs
  are compute-bound);
* backward: every forward part and floor twice (input gradients and weight gradients each cost a
  forward's GEMMs; weights are read and gradients written);
* optimizer: one ``torch.optim.AdamW.step()`` over every parameter the stage holds, ``P_stage``
  (layers, plus ``V * h`` embedding on stage 0, plus ``h + V * h`` norm and head on the last stage --
  a tied head adds only the norm when the stage also holds the embedding), as calibrate measures it:
  moments kept in the parameter dtype, so the step reads weight, gradient, m, v and writes weight,
  m, v: ``7 * b`` bytes per parameter (14 bytes in bf16), memory-bound at ``me``; no compute part;
* ``latency_std_s`` = 0 and ``repeats`` = 0 (nothing was timed);
* ``peak_memory_bytes``: weights, gradients and the two AdamW moments, ``4 * b`` bytes per stage
  parameter, plus in ``forward`` and ``backward`` the activations autograd saves, the estimate
  calibrate uses on the CPU without attention scores (flash attention): ``L_s * T * (12 h + 6 i) * b``,
  plus ``2 * T * h * b`` for the stage's input and output, plus ``3 * T * V * 4`` fp32 logits and their
  gradient on the last stage. ``optimizer`` holds no activations.

``lora_step`` (the whole model, base frozen, LoRA adapters on ``q_proj``, ``k_proj``, ``v_proj`` and
``o_proj`` of every layer; one GPU)

* grid: ``rank`` in {8, 16, 32, 64}, ``micro_batch`` and ``seq_len`` as above;
* ``trainable_params`` ``A = L * rank * ((h + h) + (h + kv) + (h + kv) + (h + h))`` (``rank * (in +
  out)`` per adapted linear layer); ``num_layers`` = the model's layers;
* forward: the full model's forward (linear layers, attention and LM head over all ``T`` tokens, as
  above with ``L_s = L``) plus the adapters, ``2 * A * T`` FLOPs at ``ge`` against ``A * b`` bytes;
* backward: the frozen linear layers and LM head need input gradients only (1x their forward FLOPs
  and bytes); attention has no weights, so all of Q, K and V need gradients (2x, floors too); the adapters
  need input and weight gradients (2x); the element-wise kernels 2x;
* optimizer: AdamW over the adapter parameters only, ``7 * b * A`` bytes;
* ``peak_memory_bytes``: all weights, plus ``4 * b`` bytes per adapter parameter (adapter weight,
  gradient, m, v), plus (forward and backward) the activations as for a 1-stage ``train_stage``.

``interference`` (calibrate's columns; ``repeats`` = 0; alone latencies are the roofline's, the
co-run latencies are alone x slowdown)

Each kernel sequence ``k`` is described by its solo roofline at a representative shape
(``roofline.KernelCost.profile``): ``c_k`` and ``m_k``, the sums of its parts' compute and memory times
over its solo time ``T_k``, and ``g_k``, the share of ``T_k`` during which its kernels run on the GPU
(everything but the per-iteration overhead and the all-reduces); ``o_k = 1 - max(c_k, m_k)``.
Co-running, HBM bandwidth is shared, ``X_m = max(1, m_a + m_b)``, and:

* ``streams`` (no SM partition; ``sm_share_a`` = ``sm_share_a_actual`` = ``sm_share_b`` = 1): the larger of
  two effects. *Contention* for compute and bandwidth, ``max(c_k X_c, m_k X_m) + o_k`` with ``X_c = max(1,
  c_a + c_b)``. *SM occupancy*: the block scheduler gives SMs to whichever blocks are waiting, so a
  kernel launched while the other side's blocks hold the SMs waits for them; the side's GPU time
  stretches in proportion to how much of the time the other keeps the GPU busy, ``1 + g_k g_other``.
  A decode step beside a training step (``g`` ~0.8 and ~1) slows ~1.8x, the training step as much.
  Evidence: naive sharing of a GPU between inference and training raised inference P99 latency by
  188.9 % (Tally, ASPLOS'25, against TGS-style sharing; 7.2 % with its kernel slicing) -- the streams
  default sits below that tail, and ``costs.interference_scale`` spans it;
* ``green_context`` at ``sm_share_a`` = p_a in {0.1, ..., 0.9} (``sm_share_a_actual`` = p_a,
  ``sm_share_b`` = p_b = 1 - p_a): a kernel's compute runs on its own SMs only, ``c_k / p_k``, and its
  memory-bound work slows as :func:`partition_memory_factor` (``1 + k (1/p - 1)^gamma`` through the
  measured decode slowdowns on part of an H200: 1.33x on 32 of 132 SMs, 1.09x on 64; sglang-omni PR
  #1934), or by the shared bandwidth ``X_m`` if that is more: ``slowdown_k = max(c_k / p_k, m_k * max(X_m,
  f(p_k))) + o_k``. No occupancy term: the partition keeps the other side's blocks off a side's SMs.

Both are >= 1 and equal 1 when nothing runs beside. Sides: ``kind_a`` ``decode`` at (``batch_size``,
``kv_tokens_per_seq``) in {(8, 512), (32, 1024), (128, 1024)}, ``prefill`` at (``batch_tokens``,
``num_seqs``) in {(512, 1), (2048, 1), (8192, 4)} -- on the directory's TP degree; shapes whose
sequences exceed ``max_context_len`` are left out -- beside ``kind_b`` ``train`` (forward + backward of
stage 0 of a 2-stage split, micro-batch 1, 2048 tokens) or ``lora`` (forward + backward, rank 16,
micro-batch 4, 1024 tokens); training sequence lengths are capped at ``max_context_len``.

Interference is the most uncertain input until measured on the user's GPU: the simulator scales every
co-run slowdown by ``costs.interference_scale`` (``InterferenceTable``), and a sweep over it says whether
a comparison's ranking holds. Measured tables from calibrate/ replace these estimates.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from simcolo.costs.roofline import KernelCost, KernelProfile, Roofline, RooflineParams
from simcolo.costs.schema import RESERVED_COLUMNS, TRAINING_PHASES, stage_layers
from simcolo.costs.tables import FLOAT_FORMAT
from simcolo.specs import GPUSpec, ModelSpec

STAGE_COUNTS = (1, 2, 4, 8)
MICRO_BATCHES = (1, 2, 4, 8, 16)
SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)
LORA_RANKS = (8, 16, 32, 64)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

#: Bytes moved per parameter by one AdamW step, in units of the parameter dtype: read weight,
#: gradient, m, v; write weight, m, v (torch.optim.AdamW keeps the moments in the parameter dtype).
ADAMW_STEP_ELEMENTS = 7
#: Training state per trained parameter, in units of the parameter dtype: weight, gradient, m, v.
TRAIN_STATE_ELEMENTS = 4

#: Decode step time alone on part of an H200's SMs relative to the whole GPU, measured with CUDA green
#: contexts: 1.33x on 32 of 132 SMs, 1.09x on 64 (sglang-omni PR #1934). ``partition_memory_factor`` passes
#: through both points.
MEASURED_DECODE_PARTITION = ((32 / 132, 1.33), (64 / 132, 1.09))
SM_SHARES = tuple(k / 10 for k in range(1, 10))
DECODE_SHAPES = ((8, 512), (32, 1024), (128, 1024))     # (batch_size, kv_tokens_per_seq)
PREFILL_SHAPES = ((512, 1), (2048, 1), (8192, 4))       # (batch_tokens, num_seqs)
TRAIN_SHAPE = (1, 2048)      # (micro_batch, seq_len), stage 0 of TRAIN_SHAPE_STAGES
TRAIN_SHAPE_STAGES = 2
LORA_SHAPE = (4, 1024)       # (micro_batch, seq_len) at rank LORA_SHAPE_RANK
LORA_SHAPE_RANK = 16


def stage_counts(model: ModelSpec) -> list[int]:
    return [n for n in STAGE_COUNTS if n <= model.num_layers]


def seq_len_grid(model: ModelSpec) -> list[int]:
    """:data:`SEQ_LENS` up to ``max_context_len``, plus ``max_context_len`` when it is below the
    largest; at least two values."""
    ctx = model.max_context_len
    out = [s for s in SEQ_LENS if s <= ctx]
    if ctx < SEQ_LENS[-1] and ctx not in out:
        out.append(ctx)
    if len(out) < 2:
        out.insert(0, max(1, ctx // 2))
    return out


#: Back-compatible name: a training phase is costed like any kernel sequence.
PhaseCost = KernelCost


def _partition_shape() -> tuple[float, float]:
    """(k, gamma) of ``1 + k (1/p - 1)^gamma`` through :data:`MEASURED_DECODE_PARTITION`."""
    (p1, s1), (p2, s2) = MEASURED_DECODE_PARTITION
    x1, x2 = 1.0 / p1 - 1.0, 1.0 / p2 - 1.0
    gamma = math.log((s1 - 1.0) / (s2 - 1.0)) / math.log(x1 / x2)
    return (s1 - 1.0) / x1 ** gamma, gamma


PARTITION_K, PARTITION_GAMMA = _partition_shape()


def partition_memory_factor(share: float) -> float:
    """How much longer the memory-bound work of a kernel takes on ``share`` of the SMs than on all of
    them: ``1 + k (1/share - 1)^gamma``, fitted to the measured decode slowdowns of
    :data:`MEASURED_DECODE_PARTITION` -- mild above half the SMs (1.09x at 48 %), steep below a quarter
    (1.33x at 24 %, 2.2x at 10 %). Streaming HBM needs only part of the SMs, so it degrades far less than
    ``1 / share``."""
    if share >= 1.0:
        return 1.0
    return 1.0 + PARTITION_K * (1.0 / share - 1.0) ** PARTITION_GAMMA


def co_run_slowdowns(a: KernelProfile, b: KernelProfile, share_a: float | None) -> tuple[float, float]:
    """Slowdowns (a, b) of two kernel sequences co-running: plain streams (``share_a`` None) or an SM
    partition giving ``share_a`` of the SMs to a and the rest to b (module docstring)."""
    x_m = max(1.0, a.m + b.m)
    if share_a is None:
        x_c = max(1.0, a.c + b.c)
        out = []
        for k, other in ((a, b), (b, a)):
            contention = max(k.c * x_c, k.m * x_m) + k.o
            occupancy = 1.0 + k.g * other.g
            out.append(contention if contention > occupancy else occupancy)
        return out[0], out[1]
    out = []
    for k, p in ((a, share_a), (b, 1.0 - share_a)):
        out.append(max(k.c / p, k.m * max(x_m, partition_memory_factor(p))) + k.o)
    return out[0], out[1]


class TrainingRoofline:
    """Training phases of ``model`` on one ``gpu`` (tp=1), by the formulas of the module docstring."""

    def __init__(self, model: ModelSpec, gpu: GPUSpec, params: RooflineParams = RooflineParams()):
        params.validate()
        self.model, self.gpu, self.params = model, gpu, params
        self._gemm = gpu.peak_bf16_flops * params.gemm_efficiency
        self._peak = gpu.peak_bf16_flops
        self._bw = gpu.hbm_bandwidth_bytes_per_s * params.memory_efficiency
        self._serve = Roofline(model, gpu, 1, params)     # the shared kernel terms, at tp 1

    # ------------------------------------------------------------------ parameters
    def stage_params(self, num_stages: int, stage: int) -> int:
        """Parameters stage ``stage`` holds (and AdamW steps)."""
        m = self.model
        first, last = stage == 0, stage == num_stages - 1
        n = len(stage_layers(m.num_layers, num_stages, stage)) * m.layer_params
        if first:
            n += m.embedding_params
        if last:
            n += m.hidden_size + (m.vocab_size * m.hidden_size if (not m.tie_embeddings or not first) else 0)
        return n

    def lora_trainable_params(self, rank: int) -> int:
        m = self.model
        h, kv = m.hidden_size, m.num_kv_heads * m.head_dim
        per_target = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h}
        return m.num_layers * rank * sum(per_target[t] for t in LORA_TARGETS)

    # ------------------------------------------------------------------ forward parts
    def _forward_parts(self, layers: int, head: bool, micro_batch: int, seq_len: int
                       ) -> tuple[list[tuple[float, float]], float]:
        """([linear, attention, element-wise(, head)] (compute s, memory s), attention floors s) of a forward
        over ``layers`` layers."""
        m, b = self.model, self.model.dtype_bytes
        tokens = micro_batch * seq_len
        p_layers = layers * m.layer_params
        kv = m.num_kv_heads * m.head_dim
        parts = [
            (2.0 * p_layers * tokens / self._gemm, p_layers * b / self._bw),
            (2.0 * layers * micro_batch * seq_len * seq_len * m.hidden_size
             / (self._peak * self._serve.attention_efficiency(seq_len)),
             layers * tokens * 2 * kv * b / self._bw),
            (0.0, self._serve.elementwise_s(tokens, layers)),
        ]
        if head:
            parts.append((2.0 * m.hidden_size * m.vocab_size * tokens / self._gemm,
                          m.hidden_size * m.vocab_size * b / self._bw))
        return parts, self._serve.attention_floor_s(micro_batch, layers)

    def _cost(self, parts, busy_s: float) -> KernelCost:
        return KernelCost(tuple(parts), busy_s, self.params.train_phase_overhead_s, self.params.ridge_sharpness)

    def _activation_bytes(self, layers: int, head: bool, micro_batch: int, seq_len: int) -> int:
        m, b = self.model, self.model.dtype_bytes
        tokens = micro_batch * seq_len
        act = layers * tokens * (12 * m.hidden_size + 6 * m.intermediate_size) * b
        act += 2 * tokens * m.hidden_size * b
        if head:
            act += 3 * tokens * m.vocab_size * 4
        return act

    # ------------------------------------------------------------------ train_stage
    def stage_phase(self, num_stages: int, stage: int, phase: str, micro_batch: int, seq_len: int
                    ) -> PhaseCost:
        if phase == "optimizer":
            nbytes = ADAMW_STEP_ELEMENTS * self.model.dtype_bytes * self.stage_params(num_stages, stage)
            return self._cost(((0.0, nbytes / self._bw),), 0.0)
        layers = len(stage_layers(self.model.num_layers, num_stages, stage))
        parts, floors = self._forward_parts(layers, stage == num_stages - 1, micro_batch, seq_len)
        if phase == "forward":
            return self._cost(parts, floors)
        if phase == "backward":
            return self._cost(((2.0 * c, 2.0 * mem) for c, mem in parts), 2.0 * floors)
        raise ValueError(f"unknown phase {phase!r}; expected one of {list(TRAINING_PHASES)}")

    def stage_peak_memory_bytes(self, num_stages: int, stage: int, phase: str, micro_batch: int,
                                seq_len: int) -> int:
        state = TRAIN_STATE_ELEMENTS * self.model.dtype_bytes * self.stage_params(num_stages, stage)
        if phase == "optimizer":
            return state
        layers = len(stage_layers(self.model.num_layers, num_stages, stage))
        return state + self._activation_bytes(layers, stage == num_stages - 1, micro_batch, seq_len)

    # ------------------------------------------------------------------ lora_step
    def lora_phase(self, rank: int, phase: str, micro_batch: int, seq_len: int) -> PhaseCost:
        b = self.model.dtype_bytes
        adapters = self.lora_trainable_params(rank)
        if phase == "optimizer":
            return self._cost(((0.0, ADAMW_STEP_ELEMENTS * b * adapters / self._bw),), 0.0)
        (linear, attn, elementwise, head), floors = self._forward_parts(self.model.num_layers, True, micro_batch,
                                                                         seq_len)
        adapter = (2.0 * adapters * micro_batch * seq_len / self._gemm, adapters * b / self._bw)
        if phase == "forward":
            return self._cost((linear, attn, elementwise, head, adapter), floors)
        if phase == "backward":
            return self._cost((linear, (2.0 * attn[0], 2.0 * attn[1]), (0.0, 2.0 * elementwise[1]), head,
                               (2.0 * adapter[0], 2.0 * adapter[1])), 2.0 * floors)
        raise ValueError(f"unknown phase {phase!r}; expected one of {list(TRAINING_PHASES)}")

    def lora_peak_memory_bytes(self, rank: int, phase: str, micro_batch: int, seq_len: int) -> int:
        m, b = self.model, self.model.dtype_bytes
        weights = (m.num_layers * m.layer_params + m.embedding_params + m.hidden_size
                   + m.lm_head_params) * b
        state = weights + TRAIN_STATE_ELEMENTS * b * self.lora_trainable_params(rank)
        if phase == "optimizer":
            return state
        return state + self._activation_bytes(m.num_layers, True, micro_batch, seq_len)


# ----------------------------------------------------------------------------------------- rows

def train_stage_rows(model: ModelSpec, gpu: GPUSpec, params: RooflineParams) -> list[tuple]:
    """Rows of ``train_stage`` in ``RESERVED_COLUMNS`` order, sorted like calibrate/'s."""
    roof = TrainingRoofline(model, gpu, params)
    rows = []
    for n in stage_counts(model):
        for s in range(n):
            layers = len(stage_layers(model.num_layers, n, s))
            for mb in MICRO_BATCHES:
                for t in seq_len_grid(model):
                    for phase in sorted(TRAINING_PHASES):
                        rows.append((n, s, layers, mb, t, phase,
                                     roof.stage_phase(n, s, phase, mb, t).total_s, 0.0, 0,
                                     roof.stage_peak_memory_bytes(n, s, phase, mb, t)))
    return rows


def lora_step_rows(model: ModelSpec, gpu: GPUSpec, params: RooflineParams) -> list[tuple]:
    roof = TrainingRoofline(model, gpu, params)
    rows = []
    for r in LORA_RANKS:
        trainable = roof.lora_trainable_params(r)
        for mb in MICRO_BATCHES:
            for t in seq_len_grid(model):
                for phase in sorted(TRAINING_PHASES):
                    rows.append((r, mb, t, phase, model.num_layers, trainable,
                                 roof.lora_phase(r, phase, mb, t).total_s, 0.0, 0,
                                 roof.lora_peak_memory_bytes(r, phase, mb, t)))
    return rows


def serving_shapes(model: ModelSpec) -> dict[str, list[tuple[int, int]]]:
    """The representative serving shapes whose sequences fit in ``max_context_len``."""
    ctx = model.max_context_len
    return {"decode": [s for s in DECODE_SHAPES if s[1] <= ctx],
            "prefill": [s for s in PREFILL_SHAPES if s[0] // s[1] <= ctx]}


def training_shapes(model: ModelSpec) -> dict[str, tuple[int, int]]:
    ctx = model.max_context_len
    return {"train": (TRAIN_SHAPE[0], min(TRAIN_SHAPE[1], ctx)), "lora": (LORA_SHAPE[0], min(LORA_SHAPE[1], ctx))}


def interference_rows(model: ModelSpec, gpu: GPUSpec, tp: int, params: RooflineParams) -> list[tuple]:
    serve = Roofline(model, gpu, tp, params)
    train = TrainingRoofline(model, gpu, params)
    sides_b = {}
    shapes_b = training_shapes(model)
    mb, t = shapes_b["train"]
    stages = min(TRAIN_SHAPE_STAGES, model.num_layers)
    sides_b["train"] = (train.stage_phase(stages, 0, "forward", mb, t)
                        + train.stage_phase(stages, 0, "backward", mb, t))
    mb, t = shapes_b["lora"]
    sides_b["lora"] = (train.lora_phase(LORA_SHAPE_RANK, "forward", mb, t)
                       + train.lora_phase(LORA_SHAPE_RANK, "backward", mb, t))
    rows = []
    shapes_a = serving_shapes(model)
    for kind_a in ("decode", "prefill"):
        for x, y in shapes_a[kind_a]:
            if kind_a == "decode":
                side_a = serve.decode_cost(x, y)
            else:
                side_a = serve.prefill_cost(x, y)
            alone_a, prof_a = side_a.total_s, side_a.profile()
            for kind_b in ("lora", "train"):
                side_b = sides_b[kind_b]
                alone_b, prof_b = side_b.total_s, side_b.profile()
                bmb, bt = shapes_b[kind_b]
                runs = [("green_context", p, p, 1.0 - p) for p in SM_SHARES] + [("streams", 1.0, 1.0, 1.0)]
                for method, share, actual, share_b in runs:
                    sa, sb = co_run_slowdowns(prof_a, prof_b, None if method == "streams" else share)
                    rows.append((kind_a, x, y, kind_b, bmb, bt, method, share, actual, share_b,
                                 alone_a, alone_b, alone_a * sa, alone_b * sb, sa, sb, 0))
    return rows


def reserved_csv(table: str, rows: Iterable[Sequence]) -> str:
    """CSV text of a reserved table in ``RESERVED_COLUMNS[table]`` order: integers as integers, floats
    with :data:`FLOAT_FORMAT` (as calibrate/ writes them), strings as they are."""
    cols = RESERVED_COLUMNS[table]
    lines = [",".join(cols)]
    for row in rows:
        if len(row) != len(cols):
            raise ValueError(f"{table}: row {row!r} has {len(row)} values for {len(cols)} columns")
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(FLOAT_FORMAT.format(v))
            else:
                cells.append(str(v))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


#: table name -> file name of the tables this module adds to a roofline directory
FILES = {"train_stage": "train_stage.csv", "lora_step": "lora_step.csv", "interference": "interference.csv"}


def files_for(tp: int) -> dict[str, str]:
    """The tables a roofline directory of degree ``tp`` gets: training tables only at tp 1."""
    return dict(FILES) if tp == 1 else {"interference": FILES["interference"]}


def training_tables(model: ModelSpec, gpu: GPUSpec, tp: int, params: RooflineParams) -> dict[str, str]:
    """File name -> CSV text of ``interference`` and, at tp 1, ``train_stage`` and ``lora_step``."""
    out = {FILES["interference"]: reserved_csv("interference", interference_rows(model, gpu, tp, params))}
    if tp == 1:
        out[FILES["train_stage"]] = reserved_csv("train_stage", train_stage_rows(model, gpu, params))
        out[FILES["lora_step"]] = reserved_csv("lora_step", lora_step_rows(model, gpu, params))
    return out


def method_text(params: RooflineParams) -> str:
    p = params
    return (f"Training tables (train_stage, lora_step) are for one GPU (tp=1 stages), in tp1 directories only: "
            f"forward = linear layers (2 * params * tokens FLOPs, eff {p.gemm_efficiency}, stage weights "
            f"read once) + causal attention (2 * layers * micro_batch * seq_len^2 * hidden FLOPs, eff "
            f"{p.attention_efficiency} * seq_len / (seq_len + {p.attention_half_len}), plus its floors) + "
            f"element-wise kernels + LM head on the last stage, parts combined as the serving tables'; "
            f"backward = 2x forward (LoRA: 1x for the frozen linear layers and head, 2x attention, "
            f"element-wise kernels and adapters); optimizer = AdamW reading "
            f"and writing {ADAMW_STEP_ELEMENTS} * dtype_bytes per trained parameter; plus "
            f"{p.train_phase_overhead_s} s per phase; LoRA adapters on {', '.join(LORA_TARGETS)}. "
            f"Interference: compute share c, memory share m and GPU-busy share g of each side's solo time; "
            f"streams: max(contention max(c * max(1, c_a + c_b), m * max(1, m_a + m_b)) + 1 - max(c, m), SM "
            f"occupancy 1 + g * g_other); green contexts: max(c / SM share, m * max(max(1, m_a + m_b), 1 + "
            f"{PARTITION_K:.4f} * (1 / SM share - 1)^{PARTITION_GAMMA:.4f})) + 1 - max(c, m), the decode "
            f"slowdowns measured on 32 and 64 of an H200's 132 SMs (sglang-omni PR #1934); see "
            f"simcolo/costs/roofline_training.py.")
