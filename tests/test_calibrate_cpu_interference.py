"""Co-run interference on the CPU (method ``threads``): the serving side and the training side in two
Python threads of one process, as the CPU replay runs them; and its SM-partition analogue (method
``time_share``): the training side paced by the live replay's ``TimeShare`` gate. Real torch on the
tiny model, real threads; no assertions on absolute speed."""
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
from calibrate.measure_interference import (_threads_together, _time_share_together, CoRun, describe_method,
                                            InterferenceMeasurer, MIN_ITERATIONS, TIME_SHARE_PAIRS,
                                            TIME_SHARE_ROUNDS)
from calibrate.timing import CallTimer
from conftest import edit_csv, run_sim
from simcolo.engine.model import build_model
from simcolo.engine.sm_partition import Cancelled, paced, TimeShare
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
    assert "time_share" in note and "TimeShare" in note   # the partition method of a CPU table


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
        rows = measurer.measure(p)
        row = rows[0]
        assert row["method"] == "threads" and row["repeats"] == 5
        assert row["sm_share_a"] == row["sm_share_a_actual"] == row["sm_share_b"] == 1.0
        # the decode x lora point also yields the time-share rows, one per share, from the first rounds
        paced_rows = rows[1:]
        assert [r["sm_share_a"] for r in paced_rows] == ([0.5] if (p["kind_a"], p["kind_b"]) in TIME_SHARE_PAIRS
                                                         else [])
        for r in paced_rows:
            assert r["method"] == "time_share" and r["repeats"] == min(5, TIME_SHARE_ROUNDS)
            assert r["sm_share_a_actual"] == 0.5 and r["sm_share_b"] == 0.5
        for r in rows:
            for side in "ab":
                sd = r[f"slowdown_{side}"]
                # co-running cannot make a side much faster; the floor is loose because a shared VM's speed
                # swings by tens of percent within minutes (the timing itself is the fidelity report's business)
                assert math.isfinite(sd) and sd >= 0.5, (p, r)
                assert r[f"latency_{side}_s"] > 0 and r[f"latency_{side}_alone_s"] > 0
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
        "grids.cpu.interference.duration_s=0.02", "engine_run.enabled=false"]))
    assert result.complete
    return out, result


def test_cpu_calibration_writes_an_interference_table_the_simulator_reads(calibrated):
    out, result = calibrated
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["interference_method"] == "threads" and "GIL" in meta["interference_notes"]
    assert meta["tables"]["interference"] == "interference.csv"
    df = pd.read_csv(out / "interference.csv")
    shares = meta["grids"]["interference"]["sm_shares"]
    threads = df[df.method == "threads"]
    assert len(threads) == 4 and (threads["sm_share_a"] == 1.0).all()
    paced_rows = df[df.method == "time_share"]       # decode beside lora only, one row per share
    assert set(df["method"]) == {"threads", "time_share"}
    assert set(zip(paced_rows["kind_a"], paced_rows["kind_b"])) == {("decode", "lora")}
    assert len(paced_rows) == len(shares) and sorted(paced_rows["sm_share_a"]) == sorted(shares)
    table = InterferenceTable.load(out)
    assert table.method == "threads" and table.partition_method == "time_share"
    for a in ("prefill", "decode"):
        for b in ("train", "lora"):
            sd = table.slowdown(a, b, None)            # the unpartitioned co-run: the threads rows
            assert all(math.isfinite(x) and x >= 1.0 for x in sd)
        assert not table.has_partitions(a, "train") and table.has_partitions(a, "lora") == (a == "decode")
    assert all(math.isfinite(x) and x >= 1.0 for x in table.slowdown("decode", "lora", 0.5))
    for a, b in (("decode", "train"), ("prefill", "lora")):
        with pytest.raises(TableError, match="no SM-partition measurements"):
            table.slowdown(a, b, 0.5)


def test_threads_rows_are_checked(calibrated, tmp_path):
    out, _ = calibrated
    bad = tmp_path / "bad_share"
    shutil.copytree(out, bad)
    edit_csv(bad, "interference", lambda d: d.assign(sm_share_a=0.5))
    with pytest.raises(TableError, match="expected 1 for method 'threads'"):
        InterferenceTable.load(bad)
    both = tmp_path / "both"
    shutil.copytree(out, both)
    edit_csv(both, "interference", lambda d: pd.concat([d, d[d.method == "threads"].assign(method="streams")]))
    with pytest.raises(TableError, match=r"methods \['streams', 'threads'\]"):
        InterferenceTable.load(both)


def test_time_share_rows_are_checked(calibrated, tmp_path):
    out, _ = calibrated
    whole = tmp_path / "whole_share"
    shutil.copytree(out, whole)
    edit_csv(whole, "interference", lambda d: d.assign(sm_share_a=d.sm_share_a.where(d.method == "threads", 1.0)))
    with pytest.raises(TableError, match="expected a share < 1 for method 'time_share'"):
        InterferenceTable.load(whole)
    two = tmp_path / "two_partitions"   # one partition method per table: not the CPU's and the GPU's
    shutil.copytree(out, two)
    edit_csv(two, "interference",
             lambda d: pd.concat([d, d[d.method == "time_share"].assign(method="green_context")]))
    with pytest.raises(TableError, match=r"partition methods \['green_context', 'time_share'\]"):
        InterferenceTable.load(two)
    gpu = tmp_path / "gpu_partition"    # green-context rows answer share queries just the same
    shutil.copytree(out, gpu)
    edit_csv(gpu, "interference", lambda d: d.assign(method=d.method.replace({"time_share": "green_context"})))
    ours, theirs = InterferenceTable.load(out), InterferenceTable.load(gpu)
    assert theirs.partition_method == "green_context"
    for share in (0.1, 0.3, 0.5, 0.6, 0.9):
        assert theirs.slowdown("decode", "lora", share) == ours.slowdown("decode", "lora", share)


# ------------------------------------------------------------------------------ time share

def test_paced_installs_checkpoints_for_the_block_only():
    spec = load_model_spec("tiny")
    model = build_model(spec, seed=0).train()
    ids = torch.randint(spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    class Counting(TimeShare):
        def checkpoint(self, cancelled=lambda: False):
            calls.append(1)
            super().checkpoint(cancelled)

    gate = Counting(lambda: False)
    with paced(model, gate):
        model(ids).sum().backward()
    per_step = len(calls)
    assert per_step == 2 * (spec.num_layers + 1)       # before each block and the head, forward and backward
    with paced(model, gate):
        out = model(ids).sum()
    out.backward()                                      # a backward after the block passes no checkpoint
    model(ids).sum().backward()                         # nor does a computation outside one
    assert len(calls) == per_step + spec.num_layers + 1
    flag = [False]
    with pytest.raises(Cancelled), paced(model, None, cancelled=lambda: flag[0]):
        model(ids)                                      # no gate: cancellation checks only
        flag[0] = True
        model(ids)
    model(ids).sum().backward()                         # the hooks are gone after an exception too
    assert len(calls) == per_step + spec.num_layers + 1


def test_time_share_co_run_paces_side_b():
    """Side b's co-run latency is its compute over its share of the time: at decode share 0.75 the
    finetune is busy at most a quarter of the time while decode runs (here: always)."""
    spec = load_model_spec("tiny")
    model = build_model(spec, seed=0).train()
    ids = torch.randint(spec.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def fb():
        model(ids).sum().backward()

    fb()
    r = _time_share_together(lambda: time.sleep(0.002), fb, model, 0.75, 0.05)
    _check_overlap(r, 0.05)
    alone = math.inf
    for _ in range(5):   # the fastest of five: another job on the machine only slows a run down
        t0 = time.perf_counter()
        fb()
        alone = min(alone, time.perf_counter() - t0)
    # busy at most 1/4 of the time: about 4x alone (the sleeping side a leaves the cores to b); loose
    assert r.latency(1) > 2.5 * alone


# ------------------------------------------------------------------------------ the session calibration


def test_session_calibration_has_time_share_rows_at_the_configured_shares(cpu_calibration):
    out, _, _ = cpu_calibration
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["interference_method"] == "threads" and "time_share" in meta["interference_notes"]
    grid = meta["grids"]["interference"]
    shares = sorted(grid["sm_shares"])
    df = pd.read_csv(out / "interference.csv")
    paced_rows = df[df.method == "time_share"]
    assert set(zip(paced_rows["kind_a"], paced_rows["kind_b"])) == set(TIME_SHARE_PAIRS) == {("decode", "lora")}
    for (x, y) in grid["decode"]:               # every decode shape beside every lora shape
        for (mb, seq) in grid["lora"]:
            rows = paced_rows[(paced_rows.a_x == x) & (paced_rows.a_y == y) & (paced_rows.b_micro_batch == mb)
                              & (paced_rows.b_seq_len == seq)]
            assert sorted(rows["sm_share_a"]) == pytest.approx(shares)
            assert (rows["sm_share_a_actual"] == rows["sm_share_a"]).all()
            assert rows["sm_share_b"].to_numpy() == pytest.approx(1.0 - rows["sm_share_a"].to_numpy(), rel=1e-5)
            assert (rows["repeats"] == min(meta["repeats"], TIME_SHARE_ROUNDS)).all()
            assert (rows["slowdown_a"] > 0).all() and (rows["slowdown_b"] > 0).all()

    table = InterferenceTable.load(out)
    assert table.partition_method == "time_share"
    a, b = table.slowdown("decode", "lora", 0.5)   # what harli and static_share ask
    assert math.isfinite(a) and math.isfinite(b) and a >= 1.0 and b >= 1.0
    # A larger decode share leaves the finetune less time: its slowdown grows. Compared at the smallest
    # and largest share, and only where the busy fractions differ enough (1 - s: 3x at 0.25 vs 0.75) for
    # the machine's noise not to swamp it.
    lo, hi = shares[0], shares[-1]
    if (1.0 - lo) / (1.0 - hi) >= 1.5:
        assert table.slowdown("decode", "lora", hi)[1] > table.slowdown("decode", "lora", lo)[1]


def test_harli_simulates_and_finetunes_on_the_cpu_calibration(cpu_calibration):
    out, _, _ = cpu_calibration
    r = run_sim("model=tiny", "gpu=cpu", "cluster=cpu2", f"costs.path={out}", "policy=harli",
                "policy.prefill_instances=1", "policy.decode_instances=1", "training.micro_batch=2",
                "training.seq_len=64", "training.global_batch=2", "policy.max_micro_batch=2", "workload=poisson",
                "workload.num_requests=24", "workload.rate_rps=24", "workload.overlength=clip")
    s = r.summary
    assert s["num_finished"] == 24 and s["cost_interference"] == "threads"
    assert s["finetune_microbatches"] > 0 and s["optimizer_steps"] > 0
