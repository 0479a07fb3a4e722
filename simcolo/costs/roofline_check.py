"""The roofline's distance to the public measurements its parameters come from (``simcolo/costs/evidence``).

Each check compares one term of :class:`~simcolo.costs.roofline.Roofline`, at the measured shape, with the
measured time:

* ``linear`` and ``elementwise``: one Llama-2-7B layer on an H100 (Vidur's operator profile), the four GEMMs
  and the five element-wise kernels, 1..4096 tokens;
* ``decode_attention``: one layer of decode attention, Llama-3-70B at tp2 on an A100 (Vidur), batch 1..80 at
  32 KV tokens: the attention floor and per-sequence cost;
* ``prefill_attention``: attention efficiency by sequence length against FlashAttention-2 on an H100 SXM5
  (causal, head dim 128; FlashAttention-3 paper, Fig. 5).

``python -m simcolo.costs.roofline --check`` prints the table; ``ratio`` is roofline / measured.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from simcolo.costs.roofline import Roofline, RooflineParams, smooth_max
from simcolo.specs import load_gpu_spec, load_model_spec

EVIDENCE_DIR = Path(__file__).parent / "evidence"
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENTWISE_OPS = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")


@dataclass(frozen=True)
class Check:
    term: str        # linear | elementwise | decode_attention | prefill_attention
    setting: str     # gpu, model, what was measured
    shape: str       # the shape, e.g. "tokens=256"
    measured_s: float
    roofline_s: float
    source: str

    @property
    def ratio(self) -> float:
        return self.roofline_s / self.measured_s


def _rows(name: str) -> list[dict[str, str]]:
    with open(EVIDENCE_DIR / name, newline="") as f:
        return list(csv.DictReader(f))


def checks(params: RooflineParams = RooflineParams()) -> list[Check]:
    """Every comparison, in the order of the module docstring."""
    out = []
    h100 = load_gpu_spec("h100-sxm")
    roof = Roofline(load_model_spec("llama2-7b"), h100, 1, params)
    L = roof.model.num_layers
    src = "Vidur h100 Llama-2-7b-hf mlp.csv"
    for r in _rows("vidur_h100_llama2_7b_layer.csv"):
        t = int(r["num_tokens"])
        c, m = roof.decode_cost(t, 1).parts[0]     # the linear layers of t one-token sequences
        out.append(Check("linear", "H100, Llama-2-7B layer, 4 GEMMs", f"tokens={t}",
                         sum(float(r[k]) for k in GEMM_OPS) * 1e-3, smooth_max(c, m, params.ridge_sharpness) / L,
                         src))
        out.append(Check("elementwise", "H100, Llama-2-7B layer, 5 kernels", f"tokens={t}",
                         sum(float(r[k]) for k in ELEMENTWISE_OPS) * 1e-3, roof.elementwise_s(t, 1), src))
    a100 = Roofline(load_model_spec("llama3-70b"), load_gpu_spec("a100-80gb"), 2, params)
    for r in _rows("vidur_a100_decode_attention.csv"):
        b, kv = int(r["batch_size"]), int(r["kv_cache_size"])
        c, m = a100.decode_cost(b, kv).parts[2]
        model_s = (smooth_max(c, m, params.ridge_sharpness) + a100.attention_floor_s(b)) / a100.model.num_layers
        out.append(Check("decode_attention", "A100, Llama-3-70B tp2 layer", f"batch={b} kv={kv}",
                         float(r["attn_decode"]) * 1e-3, model_s, "Vidur a100 attention.csv"))
    for r in _rows("fa2_h100_causal_hdim128.csv"):
        s = int(r["seq_len"])
        flops = 1e12   # any fixed amount of work: the times compare the two speeds
        out.append(Check("prefill_attention", "H100 SXM5, FlashAttention-2 causal hdim 128", f"seq_len={s}",
                         flops / (float(r["tflops"]) * 1e12),
                         flops / (h100.peak_bf16_flops * roof.attention_efficiency(s)),
                         "FlashAttention-3 paper Fig. 5"))
    return out


def format_checks(found: list[Check]) -> str:
    lines = [f"{'term':<18} {'setting':<44} {'shape':<16} {'measured':>10} {'roofline':>10} {'ratio':>6}  source"]
    for c in found:
        lines.append(f"{c.term:<18} {c.setting:<44} {c.shape:<16} {c.measured_s * 1e6:>8.1f}us "
                     f"{c.roofline_s * 1e6:>8.1f}us {c.ratio:>6.2f}  {c.source}")
    worst = max(found, key=lambda c: abs(c.ratio - 1.0))
    lines.append(f"worst: {worst.term} {worst.shape}, {100 * (worst.ratio - 1):+.0f} %; "
                 f"{sum(abs(c.ratio - 1) <= 0.2 for c in found)} of {len(found)} within +-20 %")
    return "\n".join(lines)
