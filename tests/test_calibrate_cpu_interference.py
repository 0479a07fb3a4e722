"""Co-run interference on the CPU (method ``threads``): the serving side and the training side in two
Python threads of one process, as the CPU replay runs them. Real torch on the tiny model, real
threads; no assertions on absolute speed."""
from __future__ import annotations

import json
import math
import shutil
import time

import pandas as pd
import pytest
import torch

from calibrate.context import Context
from calibrate.harness import load_config, run
from calibrate.measure_interference import (_threads_together, CoRun, describe_method, InterferenceMeasurer,
                                            MIN_ITERATIONS)
from calibrate.timing import CallTimer
from conftest import edit_csv
from simcolo.costs.interference_table import InterferenceTable
from simcolo.errors import TableError
from simcolo.specs import load_model_spec

#: One shape per kind; 2 x 2 points.
GRID = {"prefill": [[128, 1]], "decode": [[8, 128]], "train": [[2, 128]], "lora": [[1, 128]], "num_stages": 1,
        "lora_rank": 8, "sm_shares": [0.5], "duration_s": 0.03}


@pytest.fixture
def measurer():
    torch.set_num_threads(1)  # as the CPU replay runs
    ctx = Context(load_model_spec("tiny"), torch.device("cpu"), torch.float32, CallTimer("cpu", 5, 0), 0)
    m = InterferenceMeasurer(ctx, dict(GRID), "grids.test.interference")
    yield m
    m.close()


def _check_overlap(r: CoRun, duration_s: float) -> None:
    """What makes a co-run latency a co-run latency: every timed iteration of one side lies inside the
    time the other side was running back to back, and neither side stopped before both ran
    ``duration_s``."""
    w0, w1 = r.window
    skew = abs(r.bounds[0][0] - r.bounds[1][0])
    assert w1 - w0 >= duration_s - skew - 1e-9
    for side in (0, 1):
        t, other = r.bounds[side], r.bounds[1 - side]
        assert all(x < y for x, y in zip(t, t[1:]))          # iterations back to back, in order
        assert t[-1] - t[0] >= duration_s                     # each side ran at least duration_s
        i, j = r.inside(side)
        assert j - i >= MIN_ITERATIONS
        # the timed iterations lie inside the other side's run: it was running all along
        assert other[0] <= t[i] and t[j] <= other[-1]
        # only the partial iterations at the two ends are left out
        assert i <= 1 and len(t) - 1 - j <= 1
        assert r.latency(side) == pytest.approx((t[j] - t[i]) / (j - i))


def test_cpu_method_is_threads():
    method, note, methods = describe_method(torch.device("cpu"))
    assert (method, methods) == ("threads", ["threads"])
    assert "thread" in note and "GIL" in note and f"intra-op threads per side: {torch.get_num_threads()}" in note


def test_co_run_keeps_both_sides_running_until_both_are_done():
    # sleeps release the GIL like torch ops; b's iterations are 20x a's
    r = _threads_together(lambda: time.sleep(0.001), lambda: time.sleep(0.02), 0.05)
    _check_overlap(r, 0.05)
    a, b = r.bounds
    # b needs MIN_ITERATIONS + 2 iterations (longer than duration_s): a went on until b had them
    assert len(b) - 1 >= MIN_ITERATIONS + 2 and a[-1] >= b[MIN_ITERATIONS + 2]
    assert r.iterations(0) > 10 * r.iterations(1)


def test_co_run_passes_on_an_error_and_stops_the_other_side():
    def boom():
        raise ValueError("side b failed")

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="side b failed"):
        _threads_together(lambda: time.sleep(0.001), boom, 10.0)
    assert time.perf_counter() - t0 < 5.0  # side a did not run on for duration_s


def test_threads_measurement_on_the_tiny_model(measurer):
    points = measurer.points()
    assert {(p["kind_a"], p["kind_b"], p["method"]) for p in points} == {
        (a, b, "threads") for a in ("prefill", "decode") for b in ("train", "lora")}
    for p in points:
        (row,) = measurer.measure(p)
        assert row["method"] == "threads" and row["repeats"] == 5
        assert row["sm_share_a"] == row["sm_share_a_actual"] == row["sm_share_b"] == 1.0
        for side in "ab":
            sd = row[f"slowdown_{side}"]
            # co-running cannot make a side much faster; the floor is loose because a shared VM's speed
            # swings by tens of percent within minutes (the timing itself is the fidelity report's business)
            assert math.isfinite(sd) and sd >= 0.5, (p, row)
            assert row[f"latency_{side}_s"] > 0 and row[f"latency_{side}_alone_s"] > 0
    # the together latencies come from runs where both sides overlap
    p = next(p for p in points if p["kind_a"] == "decode" and p["kind_b"] == "train")
    _check_overlap(_threads_together(measurer._side_a(p), measurer._side_b(p), 0.03), 0.03)


# ------------------------------------------------------------------------------ calibration -> table

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A CPU calibration with small grids, interference included (method threads)."""
    out = tmp_path_factory.mktemp("cpu_interference") / "cpu__tiny__tp1"
    torch.set_num_threads(1)
    result = run(load_config([
        f"out={out}", "measure=[prefill,decode,interference]", "repeats=3", "warmup=1", "progress_bar=false",
        "grids.cpu.prefill.batch_tokens=[16,32]", "grids.cpu.prefill.num_seqs=[1,2]",
        "grids.cpu.decode.batch_size=[1,2]", "grids.cpu.decode.kv_tokens_per_seq=[8,16]",
        "grids.cpu.interference.prefill=[[32,1]]", "grids.cpu.interference.decode=[[2,16]]",
        "grids.cpu.interference.train=[[1,32]]", "grids.cpu.interference.lora=[[1,32]]",
        "grids.cpu.interference.duration_s=0.02"]))
    assert result.complete
    return out, result


def test_cpu_calibration_writes_an_interference_table_the_simulator_reads(calibrated):
    out, result = calibrated
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["interference_method"] == "threads" and "GIL" in meta["interference_notes"]
    assert meta["tables"]["interference"] == "interference.csv"
    df = pd.read_csv(out / "interference.csv")
    assert len(df) == 4 and set(df["method"]) == {"threads"} and (df["sm_share_a"] == 1.0).all()
    table = InterferenceTable.load(out)
    assert table.method == "threads"
    for a in ("prefill", "decode"):
        for b in ("train", "lora"):
            sd = table.slowdown(a, b, None)            # the unpartitioned co-run: the threads rows
            assert all(math.isfinite(x) and x >= 1.0 for x in sd)
        assert not table.has_partitions(a, "train")
    with pytest.raises(TableError, match="no SM-partition measurements"):
        table.slowdown("decode", "lora", 0.5)


def test_threads_rows_are_checked(calibrated, tmp_path):
    out, _ = calibrated
    bad = tmp_path / "bad_share"
    shutil.copytree(out, bad)
    edit_csv(bad, "interference", lambda d: d.assign(sm_share_a=0.5))
    with pytest.raises(TableError, match="expected 1 for method 'threads'"):
        InterferenceTable.load(bad)
    both = tmp_path / "both"
    shutil.copytree(out, both)
    edit_csv(both, "interference", lambda d: pd.concat([d, d.assign(method="streams")]))
    with pytest.raises(TableError, match=r"methods \['streams', 'threads'\]"):
        InterferenceTable.load(both)
