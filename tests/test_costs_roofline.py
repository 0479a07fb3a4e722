"""The roofline formulas and the generator CLI."""
from __future__ import annotations

import json

import pytest

from simcolo.costs import CostModel, TrainingCosts
from simcolo.costs.roofline import Roofline, RooflineParams, main
from simcolo.costs.roofline_training import KernelProfile, TrainingRoofline, co_run_slowdowns, seq_len_grid
from simcolo.errors import ConfigError
from simcolo.specs import load_gpu_spec, load_model_spec


def roof(model="llama3-8b", gpu="h100-sxm", tp=1, **params):
    return Roofline(load_model_spec(model), load_gpu_spec(gpu), tp, RooflineParams(**params))


def test_sanity_targets_llama3_8b_h100():
    r = roof()
    assert 6e-3 <= r.decode_s(1, 16) <= 9e-3
    assert 6e-3 <= r.decode_s(1, 512) <= 9e-3
    assert 25e-3 <= r.prefill_s(1024, 1) <= 60e-3


def test_decode_is_memory_bound_and_prefill_compute_bound():
    r = roof()
    # doubling a small decode batch costs little (weights are read once either way) ...
    assert r.decode_s(2, 64) < 1.05 * r.decode_s(1, 64)
    # ... while doubling a large prefill nearly doubles it
    assert r.prefill_s(16384, 8) > 1.9 * r.prefill_s(8192, 4)


def test_monotone():
    r = roof()
    for n in (1, 4, 64):
        lat = [r.prefill_s(t, n) for t in (16, 64, 256, 1024, 4096, 16384)]
        assert lat == sorted(lat)
    for b in (1, 8, 256):
        lat = [r.decode_s(b, k) for k in (16, 256, 4096, 8192)]
        assert lat == sorted(lat)
    lat = [r.decode_s(b, 1024) for b in (1, 2, 8, 64, 512)]
    assert lat == sorted(lat)


def test_tensor_parallel():
    assert roof(tp=2).prefill_s(16384, 1) < roof(tp=1).prefill_s(16384, 1)
    assert roof(tp=8).prefill_s(16384, 1) < roof(tp=4).prefill_s(16384, 1)
    # all-reduce latency counts: with a huge per-all-reduce latency tp2 decode is slower than tp1
    assert roof(tp=2, allreduce_latency_s=1e-3).decode_s(1, 16) > roof(tp=1).decode_s(1, 16)
    with pytest.raises(ConfigError, match="does not divide"):
        roof("qwen2.5-7b", tp=8)


def test_more_sequences_than_tokens_is_still_evaluated():
    v = roof().prefill_s(16, 256)
    assert v > 0 and v == v


def test_params_are_validated():
    with pytest.raises(ConfigError, match="gemm_efficiency"):
        roof(gemm_efficiency=1.5)
    with pytest.raises(ConfigError, match="iteration_overhead_s"):
        roof(iteration_overhead_s=0)


def test_cli_writes_a_loadable_directory_with_params(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["--gpu", "a100-80gb", "--model", "tiny", "--tp", "1", "--out", str(out),
                 "--param", "iteration_overhead_s=0.002"]) == 0
    cm = CostModel.load(out)
    assert cm.metadata["source"] == "roofline"
    assert cm.metadata["roofline_params"]["iteration_overhead_s"] == 0.002
    # tiny model: the overhead dominates, kernel floors add a few per cent
    assert cm.decode_s(1, 16) == pytest.approx(roof("tiny", "a100-80gb", iteration_overhead_s=0.002).decode_s(1, 16))
    assert 0.002 < cm.decode_s(1, 16) < 0.0022


def test_cli_keeps_measured_tables_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "m"
    main(["--gpu", "h100-sxm", "--model", "tiny", "--out", str(out)])
    meta = json.loads((out / "metadata.json").read_text())
    meta["source"] = "measured"
    (out / "metadata.json").write_text(json.dumps(meta))
    assert main(["--gpu", "h100-sxm", "--model", "tiny", "--out", str(out)]) == 1
    assert "holds measured tables" in capsys.readouterr().err
    assert main(["--gpu", "h100-sxm", "--model", "llama9", "--out", str(tmp_path / "n")]) == 1
    assert "unknown model 'llama9'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ training and interference

def train_roof(model="llama3-8b", gpu="h100-sxm", **params):
    return TrainingRoofline(load_model_spec(model), load_gpu_spec(gpu), RooflineParams(**params))


def test_training_phases_follow_the_formulas():
    r = train_roof()
    o = r.params.train_phase_overhead_s
    m = load_model_spec("llama3-8b")
    fwd = r.stage_phase(2, 0, "forward", 1, 2048).total_s
    assert r.stage_phase(2, 0, "backward", 1, 2048).total_s == pytest.approx(2 * (fwd - o) + o)
    # stage 0 of 2: 16 layers and the embedding; AdamW moves 7 x 2 bytes per parameter
    params = 16 * m.layer_params + m.embedding_params
    assert r.stage_params(2, 0) == params
    bw = load_gpu_spec("h100-sxm").hbm_bandwidth_bytes_per_s * r.params.memory_efficiency
    assert r.stage_phase(2, 0, "optimizer", 1, 2048).total_s == pytest.approx(14 * params / bw + o)
    # large micro-batches are compute-bound: ~2 * params * tokens FLOPs
    flops = 2 * 16 * m.layer_params * 16 * 4096
    assert r.stage_phase(2, 0, "forward", 16, 4096).total_s > flops / (989e12 * r.params.gemm_efficiency)
    assert r.lora_trainable_params(16) == 32 * 16 * (6 * 4096 + 2 * 1024)
    assert r.stage_peak_memory_bytes(1, 0, "optimizer", 1, 128) == 8 * m.num_params


def test_seq_len_grid_stops_at_the_context():
    assert seq_len_grid(load_model_spec("llama3-8b")) == [128, 256, 512, 1024, 2048, 4096]
    assert seq_len_grid(load_model_spec("tiny")) == [128, 256, 512]


def test_contention_model():
    decode, train = KernelProfile(c=0.1, m=0.8), KernelProfile(c=0.9, m=0.1)
    assert co_run_slowdowns(decode, KernelProfile(0.0, 0.0), None) == pytest.approx((1.0, 1.0))
    sa, sb = co_run_slowdowns(decode, train, None)
    assert sa >= 1 and sb == pytest.approx(0.9 * 1.0 + 0.1)          # c_a + c_b = 1: no SM contention
    sa, sb = co_run_slowdowns(KernelProfile(0.9, 0.1), train, None)
    assert sa == pytest.approx(0.9 * 1.8 + 0.1) and sb == pytest.approx(0.9 * 1.8 + 0.1)
    # partition: compute / share, memory limited below half the SMs
    sa, sb = co_run_slowdowns(decode, train, 0.25)
    assert sa == pytest.approx(0.8 * 2.0 + 0.2) and sb == pytest.approx(0.9 / 0.75 + 0.1)


def test_training_overhead_param_reaches_the_tables(tmp_path):
    out = tmp_path / "t"
    assert main(["--gpu", "h100-sxm", "--model", "tiny", "--out", str(out),
                 "--param", "train_phase_overhead_s=0.002"]) == 0
    tc = TrainingCosts.load(out)
    assert tc.metadata["roofline_params"]["train_phase_overhead_s"] == 0.002
    assert tc.lora_s(8, "optimizer", 1, 128) == pytest.approx(0.002, rel=0.01)   # tiny: overhead only
    with pytest.raises(ConfigError, match="train_phase_overhead_s"):
        train_roof(train_phase_overhead_s=-1.0)
