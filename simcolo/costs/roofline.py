"""Analytical roofline cost tables, for GPU × model × tensor-parallel degrees nobody has measured.

Every part of an iteration is costed as ``max(FLOPs / (peak · eff), bytes / (HBM bandwidth · eff))``
and the parts are summed (kernels of one iteration run one after another, so their times add); a fixed
per-iteration overhead and the tensor-parallel all-reduces are added on top. Per GPU of a TP group:

* linear layers: ``2 · P_layers / tp`` FLOPs per token (``P_layers``: all decoder-layer parameters,
  i.e. the non-embedding parameters without the LM head); their weights are read once per iteration;
* LM head: ``2 · hidden · vocab / tp`` FLOPs per *sequence* (engines compute logits of the last token
  only); its weight is read once per iteration. The input embedding is a gather of a few rows, not a
  read of the table, so it is not costed;
* prefill attention, causal, for a sequence of ``s`` tokens: ``2 · L · s² · hidden / tp`` FLOPs (QKᵀ and
  PV are ``2 · s² · hidden`` each, halved by the mask); the batch's tokens are assumed split evenly over
  its sequences (``s = batch_tokens / num_seqs``); its memory traffic is the prompt's K and V;
* decode attention: ``4 · L · kv · hidden / tp`` FLOPs and ``kv · kv_bytes_per_token / tp`` bytes per
  sequence with ``kv`` KV-cache tokens;
* tensor parallelism: 2 all-reduces per layer of ``tokens · hidden · dtype_bytes`` bytes, costed as a
  ring: ``2(tp-1)/tp · bytes / (NVLink bandwidth · eff) + latency``.

Every directory also gets the training tables ``train_stage`` and ``lora_step`` and the co-run
``interference`` table, estimated by the formulas in ``roofline_training.py``.

Activations' memory traffic is ignored: next to the weights it is small while an iteration is
memory-bound, and once it is large the GEMMs are compute-bound. The tables are labelled
``source: roofline`` and are meant to be replaced by measured tables from calibrate/.

CLI::

    python -m simcolo.costs.roofline --gpu h100-sxm --model llama3-8b --tp 1 --out DIR
    python -m simcolo.costs.roofline --all            # regenerate every shipped directory
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
GENERATOR_VERSION = 3
GENERATOR_DATE = "2026-11-24"
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
    """Efficiency factors of the roofline; each is the achieved fraction of a datasheet peak."""

    gemm_efficiency: float = 0.6
    """Fraction of dense BF16 peak that the linear layers' GEMMs reach. Large cuBLAS GEMMs on H100/A100
    reach 60–75 % of peak; whole-model prefill MFU in vLLM/TensorRT-LLM is ~50–60 %. 0.6 sits there."""

    memory_efficiency: float = 0.8
    """Fraction of HBM peak bandwidth that weight and KV streaming reach. STREAM-like kernels reach
    ~85–90 % on H100; decode GEMV and paged attention kernels somewhat less, hence 0.8."""

    attention_efficiency: float = 0.4
    """Fraction of BF16 peak that attention kernels reach. FlashAttention-2 forward runs at ~35–50 % of
    peak on H100 (FlashAttention-3 higher); causal masking and short sequences pull it down, so 0.4."""

    iteration_overhead_s: float = 1.5e-3
    """Fixed time per iteration: CPU-side scheduling, input preparation, sampling and output
    processing, plus kernel/graph launches. vLLM-class engines spend ~1–2 ms per step on these even
    with CUDA graphs; 1.5 ms also puts Llama-3-8B batch-1 decode on H100 near the ~7 ms that is
    measured in practice."""

    allreduce_latency_s: float = 10e-6
    """Fixed latency per tensor-parallel all-reduce (launch + synchronisation). NCCL and vLLM's custom
    all-reduce take ~5–15 µs for small messages over NVLink."""

    interconnect_efficiency: float = 0.8
    """Fraction of the one-directional NVLink bandwidth that a ring all-reduce reaches (NCCL bus
    bandwidth is ~75–85 % of the link peak for large messages)."""

    train_phase_overhead_s: float = 0.3e-3
    """Fixed time added to each training phase of the ``train_stage`` and ``lora_step`` tables (one
    forward, one backward or one optimizer step of a micro-batch): autograd and Python dispatch plus
    the launch gaps of the few hundred kernels a phase runs that are not hidden behind GPU work.
    Eager PyTorch training steps show ~0.1–0.5 ms of such gaps per phase once the GPU is busy; 0.3 ms
    sits there. See ``simcolo/costs/roofline_training.py``."""

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0 or (f.name.endswith("efficiency") and value > 1):
                raise ConfigError(f"roofline parameter {f.name} = {value!r} must be > 0"
                                  + (" and <= 1" if f.name.endswith("efficiency") else ""))


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
        self._attn_flops = gpu.peak_bf16_flops * p.attention_efficiency
        self._mem_bw = gpu.hbm_bandwidth_bytes_per_s * p.memory_efficiency
        self._link_bw = gpu.nvlink_bandwidth_bytes_per_s * p.interconnect_efficiency

    def _allreduce_s(self, tokens: float) -> float:
        tp = self.tp
        if tp == 1:
            return 0.0
        nbytes = tokens * self.model.hidden_size * self.model.dtype_bytes
        one = 2.0 * (tp - 1) / tp * nbytes / self._link_bw + self.params.allreduce_latency_s
        return 2 * self.model.num_layers * one

    def prefill_parts(self, batch_tokens: int, num_seqs: int) -> list[tuple[float, float]]:
        """(compute time, memory time) of the linear layers, LM head and attention of a prefill
        iteration; each part costs the larger of the two (see :meth:`prefill_s`)."""
        L, h = self.model.num_layers, self.model.hidden_size
        seq_len = batch_tokens / num_seqs
        return [
            (self._linear_flops_per_token * batch_tokens / self._gemm_flops, self._linear_bytes / self._mem_bw),
            (self._head_flops_per_seq * num_seqs / self._gemm_flops, self._head_bytes / self._mem_bw),
            (2.0 * L * batch_tokens * seq_len * h / self.tp / self._attn_flops,
             batch_tokens * self._kv_bytes_per_token / self._mem_bw),
        ]

    def prefill_fixed_s(self, batch_tokens: int, num_seqs: int) -> float:
        """The part of a prefill iteration that is neither compute nor HBM traffic: the iteration
        overhead and the tensor-parallel all-reduces."""
        return self.params.iteration_overhead_s + self._allreduce_s(batch_tokens)

    def prefill_s(self, batch_tokens: int, num_seqs: int) -> float:
        """A prefill iteration of ``batch_tokens`` prompt tokens in ``num_seqs`` equal sequences. Also
        evaluated for ``num_seqs > batch_tokens`` (sequences shorter than one token), which only exists
        to keep the table a full grid."""
        linear, head, attn = (max(c, m) for c, m in self.prefill_parts(batch_tokens, num_seqs))
        return linear + head + attn + self.params.iteration_overhead_s + self._allreduce_s(batch_tokens)

    def decode_parts(self, batch_size: int, kv_tokens_per_seq: int) -> list[tuple[float, float]]:
        """(compute time, memory time) of the linear layers, LM head and attention of a decode iteration."""
        L, h = self.model.num_layers, self.model.hidden_size
        kv_total = batch_size * kv_tokens_per_seq
        return [
            (self._linear_flops_per_token * batch_size / self._gemm_flops, self._linear_bytes / self._mem_bw),
            (self._head_flops_per_seq * batch_size / self._gemm_flops, self._head_bytes / self._mem_bw),
            (4.0 * L * kv_total * h / self.tp / self._attn_flops, kv_total * self._kv_bytes_per_token / self._mem_bw),
        ]

    def decode_fixed_s(self, batch_size: int, kv_tokens_per_seq: int) -> float:
        """Iteration overhead plus tensor-parallel all-reduces of a decode iteration."""
        return self.params.iteration_overhead_s + self._allreduce_s(batch_size)

    def decode_s(self, batch_size: int, kv_tokens_per_seq: int) -> float:
        """A decode iteration of ``batch_size`` sequences, each attending to ``kv_tokens_per_seq`` tokens."""
        linear, head, attn = (max(c, m) for c, m in self.decode_parts(batch_size, kv_tokens_per_seq))
        return linear + head + attn + self.params.iteration_overhead_s + self._allreduce_s(batch_size)


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
    return (f"Analytical roofline ({GENERATOR}), not a measurement. Each part of an iteration costs "
            f"max(FLOPs / (peak * eff), bytes / (HBM bandwidth * {p.memory_efficiency})); parts are "
            f"summed. Linear layers: 2 * decoder-layer params / tp FLOPs per token, eff "
            f"{p.gemm_efficiency}, weights read once per iteration. LM head: 2 * hidden * vocab / tp "
            f"FLOPs per sequence. Prefill attention: 2 * layers * s^2 * hidden / tp FLOPs per sequence "
            f"of s = batch_tokens / num_seqs tokens (also evaluated for num_seqs > batch_tokens to keep "
            f"the grid rectangular), eff {p.attention_efficiency}. Decode attention: reads kv tokens * "
            f"kv_bytes_per_token / tp. Plus {p.iteration_overhead_s} s per iteration and, for tp > 1, "
            f"2 ring all-reduces per layer (2(tp-1)/tp * tokens * hidden * dtype_bytes / (NVLink * "
            f"{p.interconnect_efficiency}) + {p.allreduce_latency_s} s). See roofline_params and "
            f"simcolo/costs/roofline.py.")


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
    args = ap.parse_args(argv)
    params = replace(RooflineParams(), **dict(args.param))
    try:
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
