"""The roofline formulas and the generator CLI."""
from __future__ import annotations

import json

import pytest

from simcolo.costs import CostModel
from simcolo.costs.roofline import Roofline, RooflineParams, main
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
    assert cm.decode_s(1, 16) == pytest.approx(0.002, rel=0.01)   # tiny model: overhead dominates


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
