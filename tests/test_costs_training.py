"""Training costs and co-run interference read from cost-table directories: the shipped roofline tables,
a real CPU calibration, and real files corrupted on purpose."""
from __future__ import annotations

import csv
import re
import shutil

import pandas as pd
import pytest

from calibrate.harness import load_config, run
from conftest import edit_csv, edit_meta, set_cell
from simcolo.costs import CostModel, InterferenceTable, OffGridWarning, TrainingCosts
from simcolo.costs.roofline import generate
from simcolo.costs.schema import TRAINING_PHASES
from simcolo.errors import TableError

H100_8B = CostModel.resolve("h100-sxm", "llama3-8b", 1)
GRID_MB = (1, 2, 4, 8, 16)
GRID_SEQ = (128, 256, 512, 1024, 2048, 4096)


@pytest.fixture(scope="module")
def tc():
    return TrainingCosts.load(H100_8B)


@pytest.fixture(scope="module")
def it():
    return InterferenceTable.load(H100_8B)


@pytest.fixture
def tiny(tmp_path):
    """A real roofline directory for the tiny model, to be corrupted by each test."""
    return generate("h100-sxm", "tiny", 1, tmp_path / "h100-sxm__tiny__tp1")


def csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ shipped: train_stage

def test_backward_exceeds_forward_exceeds_zero(tc):
    for n in tc.stage_counts:
        for s in range(n):
            for mb, seq in [(1, 128), (2, 1000), (8, 2048), (16, 4096)]:
                fwd, bwd = tc.stage_s(n, s, "forward", mb, seq), tc.stage_s(n, s, "backward", mb, seq)
                assert bwd > fwd > 0, (n, s, mb, seq)
                assert tc.stage_s(n, s, "optimizer", mb, seq) > 0


def test_time_grows_with_micro_batch_and_seq_len(tc):
    assert tc.stage_counts == [1, 2, 4, 8]
    for n, s in [(1, 0), (2, 0), (2, 1), (4, 2), (8, 7)]:
        for phase in ("forward", "backward"):
            for seq in GRID_SEQ:
                lat = [tc.stage_s(n, s, phase, mb, seq) for mb in GRID_MB]
                assert all(b > a for a, b in zip(lat, lat[1:])), (n, s, phase, seq, lat)
            for mb in GRID_MB:
                lat = [tc.stage_s(n, s, phase, mb, seq) for seq in GRID_SEQ]
                assert all(b > a for a, b in zip(lat, lat[1:])), (n, s, phase, mb, lat)
        # the optimizer steps the parameters whatever the micro-batch
        assert tc.stage_s(n, s, "optimizer", 1, 128) == tc.stage_s(n, s, "optimizer", 16, 4096)
        mem = [tc.stage_peak_memory_bytes(n, s, mb, 1024) for mb in GRID_MB]
        assert all(b > a for a, b in zip(mem, mem[1:]))


def test_a_two_stage_split_sums_to_the_whole_model_plus_one_overhead(tc):
    overhead = tc.metadata["roofline_params"]["train_phase_overhead_s"]
    assert overhead > 0
    for phase in TRAINING_PHASES:
        for mb, seq in [(1, 128), (4, 1024), (16, 4096)]:
            one = tc.stage_s(1, 0, phase, mb, seq)
            two = tc.stage_s(2, 0, phase, mb, seq) + tc.stage_s(2, 1, phase, mb, seq)
            assert two == pytest.approx(one + overhead, rel=2e-6), (phase, mb, seq)
    # and eight stages sum to the whole model plus seven more overheads
    eight = sum(tc.stage_s(8, s, "forward", 2, 512) for s in range(8))
    assert eight == pytest.approx(tc.stage_s(1, 0, "forward", 2, 512) + 7 * overhead, rel=1e-5)


def test_lora_forward_is_cheaper_than_full_training(tc):
    for rank in (8, 16, 64):
        for mb, seq in [(1, 128), (4, 1024), (16, 4096)]:
            full = tc.stage_s(1, 0, "forward", mb, seq) + tc.stage_s(1, 0, "backward", mb, seq)
            assert 0 < tc.lora_s(rank, "forward", mb, seq) < full
            # base weights frozen: input gradients only, so backward is about one forward, not two
            assert tc.lora_s(rank, "backward", mb, seq) < 1.5 * tc.lora_s(rank, "forward", mb, seq)
    assert tc.lora_s(16, "optimizer", 1, 128) < 0.1 * tc.stage_s(1, 0, "optimizer", 1, 128)
    assert tc.lora_peak_memory_bytes(16, 4, 1024) < tc.stage_peak_memory_bytes(1, 0, 4, 1024)


def test_grid_points_return_the_stored_values_exactly(tc):
    for r in csv_rows(H100_8B / "train_stage.csv"):
        assert tc.stage_s(int(r["num_stages"]), int(r["stage"]), r["phase"], int(r["micro_batch"]),
                          int(r["seq_len"])) == float(r["latency_s"]), r
    for r in csv_rows(H100_8B / "lora_step.csv"):
        assert tc.lora_s(int(r["rank"]), r["phase"], int(r["micro_batch"]), int(r["seq_len"])) == \
            float(r["latency_s"]), r
    assert tc.off_grid == {"train_stage": {"micro_batch": 0, "seq_len": 0},
                           "lora_step": {"rank": 0, "micro_batch": 0, "seq_len": 0}}


def test_in_between_and_off_grid_queries():
    tc = TrainingCosts.load(H100_8B)  # fresh counters
    lo, hi = tc.stage_s(2, 0, "forward", 4, 1024), tc.stage_s(2, 0, "forward", 8, 1024)
    assert lo < tc.stage_s(2, 0, "forward", 6, 1024) < hi
    assert tc.lora_s(16, "forward", 4, 1024) < tc.lora_s(24, "forward", 4, 1024) < tc.lora_s(32, "forward", 4, 1024)
    assert tc.off_grid["lora_step"]["rank"] == 0
    with pytest.warns(OffGridWarning, match=r"train_stage.*'micro_batch': query 32 is above"):
        big = tc.stage_s(2, 0, "forward", 32, 1024)
    assert big > tc.stage_s(2, 0, "forward", 16, 1024)       # extrapolated, not clamped
    with pytest.warns(OffGridWarning, match=r"lora_step.*'rank': query 128 is above"):
        tc.lora_s(128, "forward", 4, 1024)
    assert tc.off_grid["train_stage"] == {"micro_batch": 1, "seq_len": 0}
    assert tc.off_grid["lora_step"] == {"rank": 1, "micro_batch": 0, "seq_len": 0}
    with pytest.raises(TableError, match=r"no rows for num_stages=3; it holds num_stages \[1, 2, 4, 8\]"):
        tc.stage_s(3, 0, "forward", 1, 128)
    with pytest.raises(ValueError, match="stage 4 must be"):
        tc.stage_s(4, 4, "forward", 1, 128)
    with pytest.raises(ValueError, match="unknown training phase 'sideways'"):
        tc.stage_s(4, 0, "sideways", 1, 128)


def test_training_tables_live_in_tp1_directories_only():
    """Stages run on one GPU each: tpN directories carry only the interference table, and loading
    training costs from one says which table is missing."""
    assert TrainingCosts.load(H100_8B).stage_s(4, 1, "backward", 2, 512) > 0
    with pytest.raises(TableError, match=r"tp4: metadata.json 'tables' has no 'train_stage' table"):
        TrainingCosts.load(CostModel.resolve("h100-sxm", "llama3-8b", 4))


# ------------------------------------------------------------------------------ measured-like tables

def test_measured_layout_maps_stages_and_drops_holes(tmp_path, tc):
    """calibrate/ measures stages first/middle/last only and skips points that do not fit."""
    d = tmp_path / "measured"
    shutil.copytree(H100_8B, d)

    def keep_representative(df):
        rep = (df.stage == 0) | (df.stage == df.num_stages - 1) | ((df.stage == 1) & (df.num_stages >= 3))
        hole = (df.num_stages == 4) & (df.stage == 1) & (df.micro_batch == 16) & (df.seq_len >= 2048)
        return df[rep & ~hole]

    edit_csv(d, "train_stage", keep_representative)
    edit_meta(d, lambda m: m.update(source="measured"))
    m = TrainingCosts.load(d)
    # stage 2 of 4 is a middle stage of 8 layers, like the measured stage 1: same cost
    assert m.stage_s(4, 2, "forward", 2, 512) == tc.stage_s(4, 1, "forward", 2, 512)
    assert m.stage_s(8, 5, "backward", 4, 256) == tc.stage_s(8, 1, "backward", 4, 256)
    assert m.stage_s(8, 7, "backward", 4, 256) == tc.stage_s(8, 7, "backward", 4, 256)
    # the hole made micro_batch 16 go for that stage (the line with most missing points)
    assert any("num_stages=4, stage=1" in x and "micro_batch=16" in x for x in m.dropped)
    with pytest.warns(OffGridWarning):
        extrapolated = m.stage_s(4, 1, "forward", 16, 4096)
    assert extrapolated == pytest.approx(tc.stage_s(4, 1, "forward", 16, 4096), rel=0.05)


def test_layer_scaling_of_an_unmeasured_middle_stage(tmp_path):
    """Qwen2.5-7B's 28 layers split into 8 stages of 4, 4, 4, 4, 3, 3, 3, 3."""
    src = CostModel.resolve("h100-sxm", "qwen2.5-7b", 1)   # 28 layers: 8 stages of 4,4,4,4,3,3,3,3
    full = TrainingCosts.load(src)
    d = tmp_path / "m"
    shutil.copytree(src, d)
    edit_csv(d, "train_stage", lambda df: df[(df.num_stages != 8) | df.stage.isin([0, 1, 7])])
    m = TrainingCosts.load(d)
    v = m.stage_s(8, 5, "forward", 2, 512)                  # 3 layers, mapped onto stage 1 (4 layers)
    assert v == pytest.approx(0.75 * full.stage_s(8, 1, "forward", 2, 512), rel=1e-12)
    assert v == pytest.approx(full.stage_s(8, 5, "forward", 2, 512), rel=0.05)


@pytest.fixture(scope="module")
def cpu_calibration(tmp_path_factory):
    """A real (small) CPU calibration of the tiny model: prefill, decode, both training tables, and
    interference (method ``threads`` on the CPU; one point here)."""
    out = tmp_path_factory.mktemp("calib") / "cpu__tiny__tp1"
    cfg = load_config([f"out={out}", "measure=[prefill,decode,train_stage,lora_step,interference]",
                       "repeats=2", "warmup=1", "progress_bar=false", "grids.cpu.prefill.batch_tokens=[16,32]",
                       "grids.cpu.prefill.num_seqs=[1,2]", "grids.cpu.decode.batch_size=[1,2]",
                       "grids.cpu.decode.kv_tokens_per_seq=[8,16]", "grids.cpu.train_stage.num_stages=[1,2]",
                       "grids.cpu.train_stage.micro_batch=[1,2]", "grids.cpu.train_stage.seq_len=[16,32]",
                       "grids.cpu.lora_step.rank=[4,8]", "grids.cpu.lora_step.micro_batch=[1,2]",
                       "grids.cpu.lora_step.seq_len=[16,32]", "grids.cpu.interference.prefill=[]",
                       "grids.cpu.interference.decode=[[2,16]]", "grids.cpu.interference.train=[[1,16]]",
                       "grids.cpu.interference.lora=[]", "grids.cpu.interference.duration_s=0.01",
                       "engine_run.enabled=false"])
    assert run(cfg).complete
    return out


def test_a_cpu_calibration_loads(cpu_calibration):
    tc = TrainingCosts.load(cpu_calibration)
    assert tc.metadata["source"] == "measured" and tc.stage_counts == [1, 2] and tc.lora_ranks == [4, 8]
    for r in csv_rows(cpu_calibration / "train_stage.csv"):
        assert tc.stage_s(int(r["num_stages"]), int(r["stage"]), r["phase"], int(r["micro_batch"]),
                          int(r["seq_len"])) == float(r["latency_s"])
    for phase in TRAINING_PHASES:
        assert tc.stage_s(2, 1, phase, 2, 24) > 0
        assert tc.lora_s(6, phase, 1, 20) > 0
    assert tc.stage_peak_memory_bytes(2, 0, 2, 32) > 0 and tc.lora_peak_memory_bytes(8, 2, 32) > 0
    assert tc.off_grid["train_stage"] == {"micro_batch": 0, "seq_len": 0}


def test_a_directory_without_interference_is_refused(cpu_calibration, tmp_path):
    d = tmp_path / "cpu__tiny__tp1"
    shutil.copytree(cpu_calibration, d)

    def unmeasured(meta):  # as calibrated on a device where calibrate/ measures no interference
        meta["tables"].pop("interference")
        meta["interference_method"] = "unavailable: no CUDA device"

    edit_meta(d, unmeasured)
    where = re.escape(str(d))
    with pytest.raises(TableError, match=rf"{where}: metadata\.json 'tables' has no 'interference' table.*"
                                         r"unavailable: no CUDA device"):
        InterferenceTable.load(d)


def test_a_directory_without_training_tables_is_refused(tiny):
    edit_meta(tiny, lambda m: m["tables"].pop("lora_step"))
    with pytest.raises(TableError, match=rf"{re.escape(str(tiny))}: metadata\.json 'tables' has no 'lora_step' table"):
        TrainingCosts.load(tiny)


# ------------------------------------------------------------------------------ interference

def test_partition_shares_trade_serving_against_training(it):
    assert it.method == "roofline"
    for kind_b in ("train", "lora"):
        high, low = it.slowdown("decode", kind_b, 0.9), it.slowdown("decode", kind_b, 0.3)
        assert high[0] < low[0]          # more SMs for decode: decode slowed less
        assert high[1] > low[1]          # ... and training slowed more
        shares = [0.1 * k for k in range(1, 10)]
        a = [it.slowdown("decode", kind_b, s)[0] for s in shares]
        b = [it.slowdown("decode", kind_b, s)[1] for s in shares]
        assert all(y <= x for x, y in zip(a, a[1:])) and all(y >= x for x, y in zip(b, b[1:]))


def test_streams_slowdowns_are_at_least_one(it):
    for kind_a in ("prefill", "decode"):
        for kind_b in ("train", "lora"):
            sa, sb = it.slowdown(kind_a, kind_b, None)
            assert sa >= 1.0 and sb >= 1.0
            for share in (0.05, 0.1, 0.37, 0.5, 0.9, 1.0):
                assert min(it.slowdown(kind_a, kind_b, share)) >= 1.0
    # two compute-bound kernels on plain streams share the SMs
    assert min(it.slowdown("prefill", "train", None)) > 1.5


def test_shares_interpolate_and_clamp(it):
    lo, mid, hi = (it.slowdown("decode", "train", s) for s in (0.2, 0.25, 0.3))
    assert mid[1] == pytest.approx((lo[1] + hi[1]) / 2)
    assert it.slowdown("decode", "train", 0.01) == it.slowdown("decode", "train", 0.1)
    assert it.slowdown("decode", "train", 1.0) == it.slowdown("decode", "train", 0.9)
    with pytest.raises(ValueError, match="kind_a 'train'"):
        it.slowdown("train", "decode", None)
    with pytest.raises(ValueError, match="share_a 0"):
        it.slowdown("decode", "train", 0)


def test_median_over_shapes_matches_the_file(it):
    df = pd.read_csv(H100_8B / "interference.csv")
    rows = df[(df.kind_a == "prefill") & (df.kind_b == "lora") & (df.method == "streams")]
    assert len(rows) == 3
    assert it.slowdown("prefill", "lora", None) == (max(1.0, rows.slowdown_a.median()),
                                                    max(1.0, rows.slowdown_b.median()))


def test_none_has_no_interference():
    none = InterferenceTable.none()
    assert none.method == "none"
    for kind_a in ("prefill", "decode"):
        for kind_b in ("train", "lora"):
            assert none.slowdown(kind_a, kind_b, None) == (1.0, 1.0)
            assert none.slowdown(kind_a, kind_b, 0.3) == (1.0, 1.0)


def test_streams_only_table_refuses_share_queries(tiny):
    edit_csv(tiny, "interference", lambda df: df[df.method == "streams"])
    edit_meta(tiny, lambda m: m.update(interference_method="streams"))
    it = InterferenceTable.load(tiny)
    assert it.method == "streams"
    assert min(it.slowdown("decode", "lora", None)) >= 1.0
    with pytest.raises(TableError, match=r"interference\.csv: the table has no SM-partition measurements"):
        it.slowdown("decode", "lora", 0.5)


# ------------------------------------------------------------------------------ malformed files

def test_negative_latency_is_named_with_file_and_line(tiny):
    set_cell(tiny, "train_stage", 4, "latency_s", -1.0)
    with pytest.raises(TableError, match=r"train_stage\.csv: row 5 \(line 6\), column 'latency_s': -1\.0; "
                                         r"expected a latency > 0 seconds"):
        TrainingCosts.load(tiny)


def test_missing_column_is_named(tiny):
    edit_csv(tiny, "lora_step", lambda df: df.drop(columns=["peak_memory_bytes"]))
    with pytest.raises(TableError, match=r"lora_step\.csv: table 'lora_step' lacks column\(s\) "
                                         r"\['peak_memory_bytes'\]; expected columns"):
        TrainingCosts.load(tiny)
    edit_csv(tiny, "interference", lambda df: df.drop(columns=["slowdown_b"]))
    with pytest.raises(TableError, match=r"interference\.csv: table 'interference' lacks column\(s\) "
                                         r"\['slowdown_b'\]"):
        InterferenceTable.load(tiny)


def test_bad_values_are_named(tiny):
    set_cell(tiny, "lora_step", 2, "phase", "sideways")
    with pytest.raises(TableError, match=r"lora_step\.csv: row 3 \(line 4\), column 'phase': 'sideways'; "
                                         r"expected one of \['forward', 'backward', 'optimizer'\]"):
        TrainingCosts.load(tiny)


def test_bad_interference_rows_are_named(tmp_path):
    d = generate("h100-sxm", "tiny", 1, tmp_path / "a")
    set_cell(d, "interference", 6, "sm_share_a_actual", "NaN")
    with pytest.raises(TableError, match=r"interference\.csv: row 7 \(line 8\), column 'sm_share_a_actual': "
                                         r".*is not a finite number"):
        InterferenceTable.load(d)
    d = generate("h100-sxm", "tiny", 1, tmp_path / "b")
    set_cell(d, "interference", 0, "kind_b", "pretrain")
    with pytest.raises(TableError, match=r"row 1 \(line 2\), column 'kind_b': 'pretrain'; expected one of"):
        InterferenceTable.load(d)


def test_duplicates_and_inconsistent_stages_are_named(tmp_path):
    d = generate("h100-sxm", "tiny", 1, tmp_path / "a")
    edit_csv(d, "train_stage", lambda df: pd.concat([df, df.iloc[[7]]], ignore_index=True))
    with pytest.raises(TableError, match=r"train_stage\.csv: duplicate point \(num_stages=1, stage=0, "
                                         r"micro_batch=\d+, seq_len=\d+, phase=\w+\) in row 8 \(line 9\)"):
        TrainingCosts.load(d)
    d = generate("h100-sxm", "tiny", 1, tmp_path / "b")
    set_cell(d, "train_stage", 0, "num_layers", 7)
    with pytest.raises(TableError, match=r"row 1 \(line 2\), column 'num_layers': 7; stage 0 of 1 of a "
                                         r"2-layer model"):
        TrainingCosts.load(d)
    d = generate("h100-sxm", "tiny", 1, tmp_path / "c")
    edit_csv(d, "train_stage", lambda df: df[~((df.num_stages == 2) & (df.stage == 1) & (df.phase == "optimizer"))])
    with pytest.raises(TableError, match=r"num_stages=2, stage=1 has no rows for phase\(s\) \['optimizer'\]"):
        TrainingCosts.load(d)


def test_too_few_points_for_a_grid_is_named(tiny):
    edit_csv(tiny, "lora_step", lambda df: df[(df["rank"] != 8) | (df.micro_batch == 1)])
    with pytest.raises(TableError, match=r"lora_step\.csv: rank=8, phase=\w+: the points present .* hold no "
                                         r"full grid with at least 2 values"):
        TrainingCosts.load(tiny)


# ------------------------------------------------------------------------------ the interference dial
def test_the_interference_dial_scales_each_slowdowns_extra_time(it):
    assert it.scaled(1.0) is it                      # scale 1 is the default table itself, bit for bit
    for share in (None, 0.2, 0.5):
        a, b = it.slowdown("decode", "lora", share)
        a2, b2 = it.scaled(2.0).slowdown("decode", "lora", share)
        assert (a2, b2) == pytest.approx((1 + 2 * (a - 1), 1 + 2 * (b - 1)))
        assert it.scaled(0.5).slowdown("decode", "lora", share) == pytest.approx((1 + (a - 1) / 2, 1 + (b - 1) / 2))
        assert it.scaled(0.0).slowdown("decode", "lora", share) == (1.0, 1.0)
    assert it.scaled(2.0).scaled(1.0).slowdown("decode", "train", None) == it.slowdown("decode", "train", None)
    with pytest.raises(ValueError, match="interference scale"):
        it.scaled(-1.0)


def test_the_dial_reaches_the_run_from_the_config():
    from simcolo.config.compose import load_config
    from simcolo.config.run import RunConfig
    from simcolo.layout.plan import _interference
    from simcolo.costs import cost_model_for

    cost = cost_model_for("h100-sxm", "llama3-8b", 1)
    default = _interference(RunConfig.from_cfg(load_config([])), cost)
    one = _interference(RunConfig.from_cfg(load_config(["costs.interference_scale=1"])), cost)
    worse = _interference(RunConfig.from_cfg(load_config(["costs.interference_scale=pessimistic"])), cost)
    assert default.scale == one.scale == 1.0 and worse.scale == 2.0
    assert one.slowdown("decode", "train", None) == default.slowdown("decode", "train", None)
    sa = default.slowdown("decode", "train", None)[0]
    assert worse.slowdown("decode", "train", None)[0] == pytest.approx(2 * sa - 1)
