"""build_workload on traces: transformations, stats, config errors and the shipped Hydra configs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from simcolo.errors import ConfigError, TraceError
from simcolo.paths import CONF_DIR
from simcolo.workload import Workload, build_workload

CONV = {"kind": "trace", "path": "traces/AzureLLMInferenceTrace_conv.csv", "format": "azure"}


def trace(max_context_len=1_000_000, **keys) -> Workload:
    return build_workload({**CONV, **keys}, max_context_len=max_context_len, rng=np.random.default_rng(0))


def rows(workload):
    return [(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in workload]


@pytest.fixture(scope="module")
def conv():
    return rows(trace())


def test_conv_through_build_workload(conv):
    ids, times, prompts, outputs = map(np.array, zip(*conv))
    assert len(conv) == 19_366 and (ids == np.arange(19_366)).all()
    assert times[0] == 0.0 and (np.diff(times) >= 0).all()
    assert times[-1] == pytest.approx(3_501.72, abs=0.01)
    assert prompts.mean() == pytest.approx(1_155, abs=1) and outputs.mean() == pytest.approx(211, abs=1)


def test_rate_scale_halves_the_span(conv):
    doubled = rows(trace(rate_scale=2.0))
    assert len(doubled) == len(conv)
    assert doubled[-1][1] == pytest.approx(conv[-1][1] / 2)
    assert [r[2:] for r in doubled] == [r[2:] for r in conv]


def test_window_rebases_and_counts(conv):
    w = trace(start_s=600.0, end_s=1200.0)
    got = rows(w)
    times = np.array([r[1] for r in conv])
    inside = (times >= 600.0) & (times < 1200.0)
    assert len(got) == inside.sum() and got[0][0] == 0 and got[0][1] == 0.0
    first = int(np.argmax(inside))
    assert got[-1][1] == pytest.approx(times[inside][-1] - times[first])
    assert got[0][2:] == conv[first][2:]
    assert w.stats.num_outside_window == first           # rows after end_s are never read


def test_window_then_rate_scale(conv):
    got = rows(trace(start_s=600.0, end_s=1200.0, rate_scale=4.0))
    assert got[-1][1] <= 600.0 / 4.0 and len(got) == len(rows(trace(start_s=600.0, end_s=1200.0)))


def test_a_workload_is_one_pass_like_a_file(conv):
    w = trace()
    head = [r.id for r in itertools.islice(w, 100)]    # a loop that stops early ...
    rest = [r.id for r in w]                            # ... and a later loop see each request once
    assert head + rest == list(range(19_366))
    assert list(w) == [] and w.stats.num_requests == 19_366


def test_max_requests_stops_early():
    w = trace(max_requests=10)
    got = rows(w)
    assert [r[0] for r in got] == list(range(10)) and w.stats.num_requests == 10


def test_clipping_is_counted(conv):
    limit = 1024
    w = trace(max_context_len=limit)
    got = rows(w)
    prompts = np.array([r[2] for r in conv])
    outputs = np.array([r[3] for r in conv])
    p_clip = prompts > limit - 1
    clipped_p = np.minimum(prompts, limit - 1)
    o_clip = clipped_p + outputs > limit
    assert all(r[2] + r[3] <= limit and r[2] < limit and r[3] >= 1 for r in got)
    s = w.stats
    assert (s.num_prompt_clipped, s.num_output_clipped, s.num_clipped) == (p_clip.sum(), o_clip.sum(), (p_clip | o_clip).sum())
    assert s.num_clipped > 0
    assert s.as_dict() == {
        "workload_source": "azure trace traces/AzureLLMInferenceTrace_conv.csv", "workload_num_requests": 19_366,
        "workload_num_clipped": s.num_clipped, "workload_num_prompt_clipped": s.num_prompt_clipped,
        "workload_num_output_clipped": s.num_output_clipped, "workload_num_dropped_failed": 0,
        "workload_num_outside_window": 0,
    }


def test_small_chunks_give_the_same_requests():
    small = trace(chunksize=7, max_requests=700)
    assert rows(small) == rows(trace(max_requests=700))


def test_burstgpt_stats_do_not_depend_on_chunksize(tmp_path):
    path = tmp_path / "burst.csv"
    body = "".join(f"{t},M,{10 + t},{0 if t % 3 == 0 else 5},0,x\n" for t in range(30))
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + body)
    cfg = {"kind": "trace", "path": str(path), "format": "burstgpt"}
    for extra in ({}, {"max_requests": 5}, {"end_s": 20.0}, {"start_s": 4.0}):
        stats = []
        for chunksize in (1, 4, 1000):
            w = build_workload({**cfg, **extra, "chunksize": chunksize}, max_context_len=4096, rng=np.random.default_rng(0))
            got = rows(w)
            stats.append((got, w.stats.as_dict()))
        assert stats[0] == stats[1] == stats[2], extra
    full = build_workload(cfg, max_context_len=4096, rng=np.random.default_rng(0))
    assert len(rows(full)) == 20 and full.stats.num_dropped_failed == 10


@pytest.mark.parametrize("keys,error,message", [
    ({"kind": "replay"}, ConfigError, r"workload\.kind = 'replay'; expected one of"),
    ({"format": "parquet"}, ConfigError, r"workload\.format = 'parquet'"),
    ({"path": None}, ConfigError, r"workload\.path must be set"),
    ({"rate_scale": 0}, ConfigError, r"workload\.rate_scale = 0; expected a number > 0"),
    ({"rate_scale": -2}, ConfigError, r"workload\.rate_scale"),
    ({"start_s": 10, "end_s": 5}, ConfigError, r"workload\.end_s"),
    ({"max_requests": 0}, ConfigError, r"workload\.max_requests"),
    ({"chunksize": 0}, ConfigError, r"workload\.chunksize"),
    ({"rate_scal": 2}, ConfigError, r"workload: unknown key\(s\) \['rate_scal'\]"),
    ({"path": "traces/nope.csv"}, TraceError, r"nope\.csv: trace file not found"),
])
def test_config_errors_name_the_key(keys, error, message):
    with pytest.raises(error, match=message):
        trace(**keys)


def test_max_context_len_must_fit_a_request():
    with pytest.raises(ConfigError, match="max_context_len"):
        trace(max_context_len=1)


@pytest.mark.parametrize("name", ["azure_conv", "azure_code", "trace", "poisson", "gamma"])
def test_shipped_configs_accept_common_overrides(name):
    overrides = [f"+workload={name}", "workload.rate_scale=2", "workload.max_requests=50", "workload.start_s=1"]
    if name == "trace":
        overrides.append("workload.path=traces/AzureLLMInferenceTrace_code.csv")
        overrides.append("workload.format=azure")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(overrides=overrides)
    text = (CONF_DIR / "workload" / f"{name}.yaml").read_text()
    assert text.startswith("# ") and "@package" not in text and "defaults" not in text
    w = build_workload(cfg.workload, max_context_len=4096, rng=np.random.default_rng(0))
    got = rows(w)
    assert len(got) == 50 and got[0][1] == 0.0


def test_generic_trace_config_needs_a_path():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(overrides=["+workload=trace"])
    with pytest.raises(ConfigError, match=r"workload\.path must be set"):
        build_workload(cfg.workload, max_context_len=4096, rng=np.random.default_rng(0))
