"""Synthetic arrivals: rates and CVs, determinism, laziness, stopping rules, length samplers."""
from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from simcolo.errors import ConfigError
from simcolo.paths import TRACES_DIR
from simcolo.workload import Request, build_workload
from simcolo.workload.synthetic import (DiurnalArrivals, EmpiricalLengths, FixedLengths, GammaArrivals, LogNormalLengths,
                                        PoissonArrivals, synthetic_chunks)

FIXED = {"kind": "fixed", "prompt_tokens": 100, "output_tokens": 10}


def synthetic(kind="poisson", seed=0, max_context_len=4096, **keys):
    cfg = {"kind": kind, "rate_rps": 4.0, "lengths": FIXED, **keys}
    if kind == "gamma":
        cfg.setdefault("cv", 2.0)
    if kind == "diurnal":
        cfg.setdefault("amplitude", 0.5)
        cfg.setdefault("period_s", 100.0)
    return build_workload(cfg, max_context_len=max_context_len, rng=np.random.default_rng(seed))


def arrivals(workload):
    return np.array([r.arrival_s for r in workload])


def test_poisson_mean_gap_is_one_over_rate():
    gaps = np.diff(arrivals(synthetic(num_requests=100_001)))
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_rate_and_cv(cv):
    gaps = np.diff(arrivals(synthetic("gamma", cv=cv, num_requests=100_001)))
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.03)


def test_same_seed_same_sequence_other_seed_differs():
    def key(w):
        return [(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w]

    lengths = {"kind": "empirical", "path": "traces/AzureLLMInferenceTrace_conv.csv", "format": "azure"}
    a = synthetic("gamma", seed=7, num_requests=1000, lengths=lengths)
    b = synthetic("gamma", seed=7, num_requests=1000, lengths=lengths)
    c = synthetic("gamma", seed=8, num_requests=1000, lengths=lengths)
    assert key(a) == key(b) != key(c)


def test_requests_are_plain_python_values():
    first = next(iter(synthetic(num_requests=3)))
    assert isinstance(first, Request)
    assert first.id == 0 and first.arrival_s == 0.0
    assert type(first.arrival_s) is float and type(first.prompt_tokens) is int and type(first.output_tokens) is int


def test_lazy_with_a_huge_request_count():
    """10^12 requests would need terabytes if generated up front; taking 5 must allocate little."""
    tracemalloc.start()
    try:
        first = list(itertools.islice(iter(synthetic(num_requests=10**12)), 5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.id for r in first] == [0, 1, 2, 3, 4]
    assert peak < 64 * 2**20


def test_unbounded_stream_is_lazy_and_stops_at_max_requests():
    w = synthetic(max_requests=70_000)            # neither num_requests nor duration_s: unbounded source
    assert len(arrivals(w)) == 70_000 and w.stats.num_requests == 70_000


def test_duration_stops_the_stream():
    times = arrivals(synthetic(duration_s=100.0))
    assert times.max() < 100.0
    assert len(times) == pytest.approx(400, rel=0.2)


def test_num_requests_across_chunks():
    chunks = list(synthetic_chunks(PoissonArrivals(1.0), FixedLengths(3, 4), np.random.default_rng(0),
                                   num_requests=10, chunk=3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    times = np.concatenate([c.arrival_s.to_numpy() for c in chunks])
    assert times[0] == 0.0 and (np.diff(times) > 0).all()


def test_empirical_lengths_are_pairs_of_the_trace():
    lengths = EmpiricalLengths.from_trace(TRACES_DIR / "AzureLLMInferenceTrace_code.csv", "azure", "code")
    prompt, output = lengths.sample(np.random.default_rng(0), 50_000)
    pairs = set(zip(lengths.prompt.tolist(), lengths.output.tolist()))
    assert set(zip(prompt.tolist(), output.tolist())) <= pairs
    assert prompt.mean() == pytest.approx(2_048, rel=0.03)


def test_gamma_parameters():
    gaps = GammaArrivals(10.0, 1.0).gaps(np.random.default_rng(1), 50_000)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)


@pytest.mark.parametrize("keys,message", [
    ({"rate_rps": 0}, "workload.rate_rps"),
    ({"rate_rps": None}, "workload.rate_rps must be a number, got None"),
    ({"cv": -1}, "workload.cv"),
    ({"num_requests": 2.5}, "workload.num_requests"),
    ({"duration_s": 0}, "workload.duration_s"),
    ({"lengths": None}, "workload.lengths must be a mapping of keys, got None"),
    ({"lengths": {"kind": "uniform"}}, "workload.lengths.kind"),
    ({"lengths": {"kind": "fixed", "prompt_tokens": 0, "output_tokens": 1}}, "workload.lengths.prompt_tokens"),
    ({"lengths": {"kind": "empirical", "path": None, "format": "azure"}}, "workload.lengths.path must be set"),
    ({"lengths": {"kind": "empirical", "path": "x.csv", "format": "xls"}}, "workload.lengths.format"),
    ({"lengths": {"kind": "lognormal", "prompt_median": 100, "prompt_sigma": 1, "output_median": 10,
                  "output_sigma": 1, "max_prompt_tokens": 0, "max_output_tokens": 9}}, "workload.lengths.max_prompt_tokens"),
    ({"lengths": {"kind": "lognormal", "prompt_median": 100}}, "workload.lengths.prompt_sigma is missing"),
    ({"lengths": {"kind": "lognormal", "prompt_tokens": 100}}, "workload.lengths.prompt_tokens is not a known key"),
])
def test_synthetic_config_errors_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        synthetic("gamma", **{"num_requests": 10, **keys})


# ------------------------------------------------------------------------------------- diurnal, log-normal
def test_diurnal_arrivals_follow_the_sinusoid():
    """rate(t) = 4 (1 - 0.6 cos(2 pi t / 100)): the count in each tenth of a period is the rate's integral."""
    times = arrivals(synthetic("diurnal", amplitude=0.6, period_s=100.0, duration_s=2000.0))
    assert times[0] == 0.0 and (np.diff(times) >= 0).all() and times[-1] < 2000.0
    counts, edges = np.histogram(times % 100.0, bins=10, range=(0.0, 100.0))
    w = 2 * np.pi / 100.0
    expected = 20 * 4.0 * (np.diff(edges) - 0.6 / w * np.diff(np.sin(w * edges)))   # 20 periods
    assert counts == pytest.approx(expected, rel=0.08)
    assert counts.argmin() in (0, 9) and counts.argmax() in (4, 5)     # trough at the start, peak mid-period
    assert len(times) == pytest.approx(4.0 * 2000.0, rel=0.03)


def test_diurnal_with_no_amplitude_is_poisson_and_the_warp_inverts_the_cumulative_rate():
    flat = np.diff(arrivals(synthetic("diurnal", amplitude=0.0, period_s=60.0, num_requests=50_001)))
    assert flat.mean() == pytest.approx(0.25, rel=0.02) and flat.std() / flat.mean() == pytest.approx(1.0, rel=0.03)
    d = DiurnalArrivals(3.0, 0.9, 50.0)
    t = np.linspace(0.0, 500.0, 1001)
    assert d.warp(d.cumulative(t)) == pytest.approx(t, abs=1e-6)


def test_lognormal_lengths_have_their_median_and_stay_within_their_caps():
    lengths = LogNormalLengths(4600, 1.0, 130, 0.8, 30720, 2048)
    prompt, output = lengths.sample(np.random.default_rng(0), 100_000)
    assert np.median(prompt) == pytest.approx(4600, rel=0.02) and np.median(output) == pytest.approx(130, rel=0.02)
    assert prompt.min() >= 1 and prompt.max() == 30720 and output.max() <= 2048
    assert prompt.dtype == output.dtype == np.int64


def test_the_presets_load_and_say_what_they_are():
    from simcolo.config.compose import load_config
    from simcolo.config.run import RunConfig

    bursty = RunConfig.from_cfg(load_config(["workload=long_bursty", "model=qwen2.5-7b",
                                             "serving.max_batched_tokens=32768"])).workload
    assert (bursty.kind, bursty.cv, bursty.lengths.kind, bursty.lengths.max_prompt_tokens) == ("gamma", 4.0, "lognormal", 30720)
    requests = list(build_workload(bursty, max_context_len=32768, rng=np.random.default_rng(0)))
    gaps = np.diff([r.arrival_s for r in requests])
    assert len(requests) == 2000 and gaps.std() / gaps.mean() > 3.0
    assert max(r.prompt_tokens + r.output_tokens for r in requests) <= 32768
    day = RunConfig.from_cfg(load_config(["workload=diurnal"])).workload
    assert (day.kind, day.amplitude, day.period_s, day.duration_s) == ("diurnal", 0.6, 900.0, 1800.0)
