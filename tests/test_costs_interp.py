"""CostModel lookups: exact at grid points, bilinear between, linear outside (warned and counted)."""
from __future__ import annotations

import warnings
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simcolo.costs import MIN_LATENCY_S, CostModel, OffGridWarning
from simcolo.costs.schema import DECODE, PREFILL
from simcolo.costs.tables import grid_csv, write_table_dir
from simcolo.specs import load_gpu_spec, load_model_spec

TOKENS, SEQS = [16, 32, 64, 128], [1, 2, 4]
BATCHES, KVS = [1, 2, 4, 8], [16, 32, 64, 128]


def curved(a, b):
    """Not bilinear, so interpolation between grid points differs from the function itself."""
    return 1e-3 + 1e-5 * a ** 1.5 + 2e-4 * b ** 2


def bilinear(a, b):
    """Reproduced exactly (up to rounding) by bilinear interpolation and its linear extrapolation."""
    return 1e-2 + 1e-4 * a + 2e-3 * b + 1e-6 * a * b


def write_dir(path, fn_prefill, fn_decode):
    model, gpu = load_model_spec("tiny"), load_gpu_spec("h100-sxm")
    meta = {"schema_version": 1, "source": "measured", "gpu": "h100-sxm", "model": "tiny", "tp": 1,
            "dtype": "bfloat16", "created": "2026-01-01", "model_config": asdict(model),
            "gpu_spec": asdict(gpu), "method": "synthetic test table",
            "tables": {"prefill": "prefill.csv", "decode": "decode.csv"}}
    write_table_dir(path, meta, {
        "prefill.csv": grid_csv(PREFILL, [(t, n, fn_prefill(t, n)) for t in TOKENS for n in SEQS]),
        "decode.csv": grid_csv(DECODE, [(b, k, fn_decode(b, k)) for b in BATCHES for k in KVS])})
    return path


@pytest.fixture
def curved_cm(tmp_path):
    return CostModel.load(write_dir(tmp_path / "t", curved, curved))


@pytest.fixture
def linear_cm(tmp_path):
    return CostModel.load(write_dir(tmp_path / "t", bilinear, bilinear))


def stored(fn, a, b):
    return float(f"{fn(a, b):.6e}")  # the value as written to CSV


def test_grid_points_are_exact(curved_cm):
    for t in TOKENS:
        for n in SEQS:
            assert curved_cm.prefill_s(t, n) == stored(curved, t, n)
    for b in BATCHES:
        for k in KVS:
            assert curved_cm.decode_s(b, b * k) == stored(curved, b, k)
            assert curved_cm.decode_s_many(b, np.array([b * k]))[0] == stored(curved, b, k)


def test_between_grid_points_is_the_linear_blend(curved_cm):
    z = lambda a, b: stored(curved, a, b)  # noqa: E731
    # along one axis
    assert curved_cm.prefill_s(48, 2) == pytest.approx(0.5 * z(32, 2) + 0.5 * z(64, 2), rel=1e-12)
    assert curved_cm.prefill_s(40, 2) == pytest.approx(0.75 * z(32, 2) + 0.25 * z(64, 2), rel=1e-12)
    assert curved_cm.prefill_s(32, 3) == pytest.approx(0.5 * z(32, 2) + 0.5 * z(32, 4), rel=1e-12)
    assert curved_cm.decode_s(2, 2 * 24) == pytest.approx(0.5 * z(2, 16) + 0.5 * z(2, 32), rel=1e-12)
    # both axes: quarter of the way in tokens, half in seqs
    want = 0.75 * (0.5 * z(16, 1) + 0.5 * z(16, 2)) + 0.25 * (0.5 * z(32, 1) + 0.5 * z(32, 2))
    assert curved_cm.prefill_s(20, 1.5) == pytest.approx(want, rel=1e-12)
    # batch sizes between grid rows blend rows
    want = 0.75 * (0.5 * z(2, 32) + 0.5 * z(2, 64)) + 0.25 * (0.5 * z(4, 32) + 0.5 * z(4, 64))
    assert curved_cm.decode_s(2.5, 2.5 * 48) == pytest.approx(want, rel=1e-12)
    assert curved_cm.prefill_s(40, 2) != pytest.approx(curved(40, 2), rel=1e-6)  # really interpolated


def test_no_warning_and_no_count_inside_the_grid(curved_cm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curved_cm.prefill_s(16, 1)
        curved_cm.prefill_s(128, 4)
        curved_cm.decode_s_many(8, np.array([8 * 16, 8 * 128, 8 * 50]))
    assert curved_cm.off_grid == {"prefill": {"batch_tokens": 0, "num_seqs": 0},
                                  "decode": {"batch_size": 0, "kv_tokens_per_seq": 0}}


def test_extrapolation_is_linear_warns_once_per_side_and_counts(linear_cm):
    approx = lambda v: pytest.approx(v, rel=1e-5)  # noqa: E731  (CSV keeps 7 digits)
    with pytest.warns(OffGridWarning, match=r"table 'prefill', axis 'batch_tokens': query 256 is above "
                                            r"the grid range \[16, 128\]") as rec:
        assert linear_cm.prefill_s(256, 2) == approx(bilinear(256, 2))
        assert linear_cm.prefill_s(512, 4) == approx(bilinear(512, 4))
    assert len(rec) == 1
    with pytest.warns(OffGridWarning, match="below"):
        assert linear_cm.prefill_s(8, 1) == approx(bilinear(8, 1))
    with pytest.warns(OffGridWarning, match="num_seqs"):
        assert linear_cm.prefill_s(64, 8) == approx(bilinear(64, 8))
    assert linear_cm.off_grid["prefill"] == {"batch_tokens": 3, "num_seqs": 1}

    with pytest.warns(OffGridWarning, match="kv_tokens_per_seq"):
        out = linear_cm.decode_s_many(2, np.array([2 * 256, 2 * 64, 2 * 512, 2 * 8]))
    assert out == pytest.approx([bilinear(2, 256), bilinear(2, 64), bilinear(2, 512), bilinear(2, 8)],
                                rel=1e-5)
    assert linear_cm.off_grid["decode"] == {"batch_size": 0, "kv_tokens_per_seq": 3}
    with pytest.warns(OffGridWarning, match="batch_size"):
        assert linear_cm.decode_s(16, 16 * 32) == approx(bilinear(16, 32))
        linear_cm.decode_s_many(16, np.array([16 * 32, 16 * 64]))
    assert linear_cm.off_grid["decode"]["batch_size"] == 3


def test_extrapolation_is_floored_not_negative(tmp_path):
    steep = lambda a, b: 1e-3 * a + 1e-3 * b - 1.5e-2  # noqa: E731  (positive on the grid only)
    cm = CostModel.load(write_dir(tmp_path / "s", lambda a, b: steep(a, b) + 0.02, steep))
    with pytest.warns(OffGridWarning):
        assert cm.decode_s(1, 1) == MIN_LATENCY_S
        assert cm.decode_s_many(1, np.array([1, 16]))[0] == MIN_LATENCY_S


def test_mixed_s_definition(curved_cm):
    cm = curved_cm
    assert cm.mixed_s(64, 2, 0, 0) == cm.prefill_s(64, 2)
    assert cm.mixed_s(0, 0, 4, 4 * 100) == cm.decode_s(4, 4 * 100)
    want = cm.prefill_s(64 + 2, 1 + 2) + cm.decode_s(2, 200) - cm.decode_s(2, 2 * 16)
    assert cm.mixed_s(64, 1, 2, 200) == pytest.approx(want, rel=1e-15)
    # decodes at the smallest measured KV add nothing beyond their tokens in the linear layers
    assert cm.mixed_s(64, 1, 2, 2 * 16) == cm.prefill_s(66, 3)
    assert cm.mixed_s(64, 1, 2, 200) > cm.mixed_s(64, 1, 2, 100) > cm.prefill_s(64, 1)
    with pytest.raises(ValueError):
        cm.mixed_s(0, 0, 0, 0)


def test_bad_batch_size(curved_cm):
    with pytest.raises(ValueError, match="batch_size"):
        curved_cm.decode_s_many(0, np.array([10]))


# --------------------------------------------------------------------- decode_s_many is elementwise

@pytest.fixture(scope="module")
def shipped_cm():
    return CostModel.load(CostModel.resolve("h100-sxm", "llama3-8b", 1))


kv_totals = st.integers(min_value=1, max_value=700 * 9000)


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 700), values=st.lists(kv_totals, min_size=1, max_size=60),
       seed=st.integers(0, 2 ** 32 - 1), long=st.booleans())
def test_decode_s_many_is_bitwise_elementwise(shipped_cm, batch, values, seed, long):
    rng = np.random.default_rng(seed)
    pad = rng.integers(1, 700 * 9000, size=10_000 if long else 100)
    where = rng.choice(pad.size, size=len(values), replace=False)
    big = pad.copy()
    big[where] = values                      # the values, embedded among many others
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffGridWarning)
        together = shipped_cm.decode_s_many(batch, big)[where]
        for v, t in zip(values, together):
            alone = shipped_cm.decode_s_many(batch, np.array([v]))
            assert alone.tobytes() == np.float64(t).tobytes()
            assert np.float64(shipped_cm.decode_s(batch, v)).tobytes() == alone.tobytes()
        also = shipped_cm.decode_s_many(batch, np.array(values))
    assert also.tobytes() == together.tobytes()


@settings(max_examples=100, deadline=None)
@given(batch=st.integers(1, 512), a=st.integers(16, 8192), b=st.integers(16, 8192),
       t=st.integers(1, 16384), n=st.integers(1, 256))
def test_lookups_are_monotone_inside_the_grid(shipped_cm, batch, a, b, t, n):
    lo, hi = min(a, b), max(a, b)
    assert shipped_cm.decode_s(batch, batch * lo) <= shipped_cm.decode_s(batch, batch * hi)
    if batch < 512:
        assert shipped_cm.decode_s(batch, batch * lo) <= shipped_cm.decode_s(batch + 1, (batch + 1) * lo)
    if t < 16384 and t >= 16:
        assert shipped_cm.prefill_s(t, n) <= shipped_cm.prefill_s(t + 1, n)
