"""The shipped roofline tables: valid, named right, reproducible, plausible."""
from __future__ import annotations

import json

import numpy as np
import pytest

from simcolo.costs import CostModel, InterferenceTable, TrainingCosts
from simcolo.costs.roofline import generate_all, shippable_configs
from simcolo.costs.schema import (METADATA_FILE, REQUIRED_TABLES, SIMULATOR_TABLES, parse_table_dir_name,
                                  table_dir_name)
from simcolo.costs.tables import read_metadata, read_required_grids
from simcolo.paths import TABLES_DIR
from simcolo.specs import load_gpu_spec, load_model_spec

SHIPPED = sorted(d for d in TABLES_DIR.iterdir() if d.is_dir())


def test_shipped_set_is_exactly_the_shippable_configs():
    assert {d.name for d in SHIPPED} == {table_dir_name(*c) for c in shippable_configs()}
    assert len(SHIPPED) >= 80


def test_every_shipped_directory_validates_and_matches_its_name():
    for d in SHIPPED:
        cm = CostModel.load(d)
        gpu, model, tp = parse_table_dir_name(d.name)
        meta = cm.metadata
        assert (meta["gpu"], meta["model"], meta["tp"]) == (gpu, model, tp), d
        assert meta["source"] == "roofline"
        assert meta["model_config"]["name"] == model and meta["gpu_spec"]["name"] == gpu
        assert meta["model_config"]["max_context_len"] == load_model_spec(model).max_context_len


def test_regeneration_is_byte_identical(tmp_path):
    generate_all(tmp_path)
    regenerated = sorted(d.name for d in tmp_path.iterdir() if d.is_dir())
    assert regenerated == [d.name for d in SHIPPED]
    for d in SHIPPED:
        files = sorted(p.name for p in d.iterdir())
        assert files == sorted(p.name for p in (tmp_path / d.name).iterdir()), d
        for name in files:
            assert (d / name).read_bytes() == (tmp_path / d.name / name).read_bytes(), (
                f"{d / name} is stale: run `python -m simcolo.costs.roofline --all`")


def test_shipped_tables_are_monotone():
    """More prompt tokens, a larger decode batch or a longer KV cache never make an iteration cheaper."""
    for d in SHIPPED:
        grids = read_required_grids(d, read_metadata(d))
        assert (np.diff(grids["prefill"].values, axis=0) >= 0).all(), d      # along batch_tokens
        assert (np.diff(grids["decode"].values, axis=0) >= 0).all(), d       # along batch_size
        assert (np.diff(grids["decode"].values, axis=1) >= 0).all(), d       # along kv_tokens_per_seq


def test_grids_cover_the_model_context():
    for d in SHIPPED:
        meta = json.loads((d / METADATA_FILE).read_text())
        ctx = meta["model_config"]["max_context_len"]
        grids = read_required_grids(d, meta)
        assert grids["decode"].cols[-1] == ctx and grids["decode"].cols[0] == 1
        assert grids["prefill"].rows[0] == 1
        assert grids["decode"].rows.tolist() == [2.0 ** i for i in range(10)]
        assert grids["prefill"].rows[-1] == max(16384, ctx) and ctx in grids["prefill"].rows
        assert grids["prefill"].cols.tolist() == [2.0 ** i for i in range(9)]
        expected = {*REQUIRED_TABLES, *SIMULATOR_TABLES} if meta["tp"] == 1 else {*REQUIRED_TABLES, "interference"}
        assert set(meta["tables"]) == expected


def test_every_shipped_directory_has_training_and_interference_tables():
    tp1 = [d for d in SHIPPED if d.name.endswith("__tp1")]
    assert TABLES_DIR / "h100-sxm__llama3-8b__tp1" in tp1
    for d in SHIPPED:
        it = InterferenceTable.load(d)
        for kind_a in ("prefill", "decode"):
            for kind_b in ("train", "lora"):
                assert min(it.slowdown(kind_a, kind_b, None)) >= 1.0, d
                assert it.slowdown(kind_a, kind_b, 0.9)[0] <= it.slowdown(kind_a, kind_b, 0.2)[0], d
    for d in tp1:
        tc = TrainingCosts.load(d)
        layers = tc.metadata["model_config"]["num_layers"]
        assert tc.stage_counts == [n for n in (1, 2, 4, 8) if n <= layers], d
        assert tc.lora_ranks == [8, 16, 32, 64], d
        assert tc.stage_s(tc.stage_counts[-1], 0, "backward", 1, 256) > tc.stage_s(tc.stage_counts[-1], 0,
                                                                                     "forward", 1, 256) > 0


def test_llama3_8b_h100_sanity():
    cm = CostModel.load(CostModel.resolve("h100-sxm", "llama3-8b", 1))
    assert 6e-3 <= cm.decode_s(1, 100) <= 9e-3
    assert 25e-3 <= cm.prefill_s(1024, 1) <= 60e-3


@pytest.mark.parametrize("gpu", ["a100-80gb", "h100-sxm", "h200"])
def test_tp2_is_faster_than_tp1_for_large_prefill(gpu):
    tp1 = CostModel.load(CostModel.resolve(gpu, "llama3-8b", 1))
    tp2 = CostModel.load(CostModel.resolve(gpu, "llama3-8b", 2))
    for tokens, seqs in [(8192, 1), (16384, 4), (4096, 16)]:
        assert tp2.prefill_s(tokens, seqs) < tp1.prefill_s(tokens, seqs)


def test_faster_gpu_is_faster():
    a100 = CostModel.load(CostModel.resolve("a100-80gb", "llama3-8b", 1))
    h100 = CostModel.load(CostModel.resolve("h100-sxm", "llama3-8b", 1))
    h200 = CostModel.load(CostModel.resolve("h200", "llama3-8b", 1))
    assert h100.prefill_s(4096, 2) < a100.prefill_s(4096, 2)
    assert h200.decode_s(64, 64 * 2000) < h100.decode_s(64, 64 * 2000) < a100.decode_s(64, 64 * 2000)


def test_models_that_do_not_fit_are_not_shipped():
    for gpu, model, tp in shippable_configs():
        assert load_model_spec(model).weight_bytes / tp <= 0.9 * load_gpu_spec(gpu).memory_bytes
    names = {d.name for d in SHIPPED}
    assert "h100-sxm__llama3-70b__tp1" not in names and "h100-sxm__llama3-70b__tp2" in names
    assert "h100-sxm__qwen2.5-7b__tp8" not in names      # 28 heads are not divisible by 8
    tiny = {n for n in names if "__tiny__" in n}
    assert tiny == {f"{g}__tiny__tp1" for g in ("a100-80gb", "h100-sxm", "h200")}
