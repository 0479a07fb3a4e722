"""Loading and validation of cost-table directories: every defect is a TableError that says where."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import edit_csv, edit_meta, set_cell
from simcolo.costs import CostModel, cost_model_for
from simcolo.costs.roofline import generate
from simcolo.errors import TableError
from simcolo.paths import TABLES_DIR


@pytest.fixture
def good(tmp_path):
    """A real roofline directory for the tiny model, to be corrupted by each test."""
    return generate("h100-sxm", "tiny", 1, tmp_path / "h100-sxm__tiny__tp1")


def test_good_directory_loads(good):
    cm = CostModel.load(good)
    assert cm.metadata["model"] == "tiny" and cm.prefill_s(100, 2) > 0


def test_missing_column(good):
    edit_csv(good, "decode", lambda df: df.drop(columns=["latency_s"]))
    with pytest.raises(TableError, match=r"decode\.csv: table 'decode' lacks column\(s\) \['latency_s'\]"):
        CostModel.load(good)


def test_non_rectangular_grid(good):
    edit_csv(good, "prefill", lambda df: df[~((df.batch_tokens == 64) & (df.num_seqs == 8))])
    with pytest.raises(TableError, match=r"prefill\.csv: table 'prefill' is not a full rectangular grid .*"
                                         r"missing 1 point\(s\) \(batch_tokens, num_seqs\): \(64, 8\)"):
        CostModel.load(good)


def test_duplicate_key(good):
    edit_csv(good, "decode", lambda df: pd.concat([df, df.iloc[[3]]], ignore_index=True))
    with pytest.raises(TableError, match=r"duplicate key \(batch_size=1, kv_tokens_per_seq=8\) in "
                                         r"row 4 \(line 5\), row \d+ \(line \d+\)"):
        CostModel.load(good)


def test_nan(good):
    set_cell(good, "prefill", 6, "latency_s", np.nan)
    with pytest.raises(TableError, match=r"prefill\.csv: row 7 \(line 8\), column 'latency_s': .* "
                                         r"is not a finite number"):
        CostModel.load(good)


def test_non_positive_latency(good):
    set_cell(good, "decode", 2, "latency_s", 0.0)
    with pytest.raises(TableError, match=r"row 3 \(line 4\), column 'latency_s': 0\.0; "
                                         r"expected a latency > 0"):
        CostModel.load(good)


@pytest.mark.parametrize("bad", [16.5, 0, "abc"])
def test_bad_key(good, bad):
    set_cell(good, "prefill", 0, "batch_tokens", bad)
    with pytest.raises(TableError, match=r"row 1 \(line 2\), column 'batch_tokens'"):
        CostModel.load(good)


def test_single_value_axis(good):
    edit_csv(good, "decode", lambda df: df[df.batch_size == 4])
    with pytest.raises(TableError, match="'batch_size' has 1 distinct value"):
        CostModel.load(good)


def test_wrong_schema_version(good):
    edit_meta(good, lambda m: m.update(schema_version=2))
    with pytest.raises(TableError, match="written by schema version 2, this simcolo reads version 1"):
        CostModel.load(good)


def test_missing_metadata(good):
    (good / "metadata.json").unlink()
    with pytest.raises(TableError, match="no metadata.json"):
        CostModel.load(good)


def test_missing_directory(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        CostModel.load(tmp_path / "nope")


def test_metadata_defects(good):
    edit_meta(good, lambda m: m["tables"].pop("decode"))
    with pytest.raises(TableError, match=r"lacks required table\(s\) \['decode'\]"):
        CostModel.load(good)
    edit_meta(good, lambda m: m["tables"].update(decode="gone.csv"))
    with pytest.raises(TableError, match="names file 'gone.csv'"):
        CostModel.load(good)
    edit_meta(good, lambda m: m["tables"].update(decode="decode.csv", speculative="decode.csv"))
    with pytest.raises(TableError, match="unknown table 'speculative'"):
        CostModel.load(good)
    edit_meta(good, lambda m: (m["tables"].pop("speculative"), m.pop("source")))
    with pytest.raises(TableError, match=r"missing key\(s\) \['source'\]"):
        CostModel.load(good)
    edit_meta(good, lambda m: m.update(source="guessed"))
    with pytest.raises(TableError, match="'source' = 'guessed'"):
        CostModel.load(good)
    edit_meta(good, lambda m: m.update(source="measured", created="last tuesday"))
    with pytest.raises(TableError, match="not an ISO date"):
        CostModel.load(good)


def test_reserved_tables_are_accepted(good):
    (good / "transfer.csv").write_text("link,bytes,latency_s\nnvlink,1000,1e-6\n")
    edit_meta(good, lambda m: m["tables"].update(transfer="transfer.csv"))
    CostModel.load(good)


def test_parquet_and_csv_load_the_same(good, tmp_path):
    pq = tmp_path / "pq"
    shutil.copytree(good, pq)
    for name in ("prefill", "decode"):
        df = pd.read_csv(pq / f"{name}.csv")
        df.sample(frac=1.0, random_state=0).to_parquet(pq / f"{name}.parquet")  # row order is free
        (pq / f"{name}.csv").unlink()
    edit_meta(pq, lambda m: m.update(tables={"prefill": "prefill.parquet", "decode": "decode.parquet"}))
    a, b = CostModel.load(good), CostModel.load(pq)
    for t, n in [(16, 1), (100, 3), (5000, 200)]:
        assert a.prefill_s(t, n) == b.prefill_s(t, n)
    kv = np.array([7 * 16, 7 * 100, 7 * 500, 7 * 20 + 3])
    assert a.decode_s_many(7, kv).tobytes() == b.decode_s_many(7, kv).tobytes()


def test_csv_values_parse_to_the_written_decimals():
    path = TABLES_DIR / "h100-sxm__llama3-8b__tp1" / "decode.csv"
    text = [float(line.rsplit(",", 1)[1]) for line in path.read_text().splitlines()[1:]]
    assert pd.read_csv(path)["latency_s"].tolist() == text


def test_resolve():
    assert CostModel.resolve("h100-sxm", "llama3-8b", 1) == TABLES_DIR / "h100-sxm__llama3-8b__tp1"
    with pytest.raises(TableError, match=r"no cost tables h100-sxm__llama3-70b__tp1 .* there are tables "
                                         r"for tp 2, 4, 8"):
        CostModel.resolve("h100-sxm", "llama3-70b", 1)
    with pytest.raises(TableError, match=r"no tables for b200 / llama3-8b; gpus with tables: a100-80gb, "
                                         r"h100-sxm, h200"):
        CostModel.resolve("b200", "llama3-8b", 1)


def test_cost_model_for(good):
    assert cost_model_for("h100-sxm", "llama3-8b", 2).metadata["tp"] == 2
    assert cost_model_for("h100-sxm", "tiny", 1, path=good).directory == good
    assert cost_model_for("h100-sxm", "tiny", 1, tables_root=good.parent).directory == good
    with pytest.raises(TableError, match="tables are for gpu=h100-sxm, model=tiny, tp=1, but the run "
                                         "uses gpu=h200, model=tiny, tp=1"):
        cost_model_for("h200", "tiny", 1, path=good)
