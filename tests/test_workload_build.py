"""build_workload on traces: transformations, stats, config errors and the shipped Hydra configs."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
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
    w = trace(max_context_len=limit, overlength="clip")
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
    ({"kind": "replay"}, ConfigError, r"^workload\.kind 'replay' is unknown; expected one of: trace, poisson, gamma, diurnal$"),
    ({"format": "parquet"}, ConfigError, r"^workload\.format 'parquet' is unknown; expected one of: azure, mooncake"),
    ({"path": None}, ConfigError, r"workload\.path must be set"),
    ({"rate_scale": 0}, ConfigError, r"^workload\.rate_scale must be > 0, got 0$"),
    ({"rate_scale": -2}, ConfigError, r"workload\.rate_scale"),
    ({"start_s": 10, "end_s": 5}, ConfigError, r"workload\.end_s"),
    ({"max_requests": 0}, ConfigError, r"workload\.max_requests"),
    ({"chunksize": 0}, ConfigError, r"workload\.chunksize"),
    ({"rate_scal": 2}, ConfigError, r"^workload\.rate_scal is not a known key \(did you mean workload\.rate_scale\?\)"),
    ({"overlength": "truncate"}, ConfigError, r"^workload\.overlength 'truncate' is unknown; expected one of: reject, clip$"),
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


def test_reject_passes_over_length_requests_on_unchanged():
    """``overlength=reject`` (the default) leaves a request as the trace has it: the serving system refuses it."""
    limit = 1024
    got, clipped = rows(trace(max_context_len=limit)), rows(trace(max_context_len=limit, overlength="clip"))
    conv = rows(trace())
    assert got == conv
    over = [a for a, b in zip(got, clipped) if a != b]
    assert len(over) == sum(1 for r in conv if r[2] + r[3] > limit) > 0
    assert trace(max_context_len=limit).stats.num_clipped == 0


@pytest.mark.parametrize("kind, extra, key, meant", [
    ("trace", {"rate_rps": 3}, "rate_rps", "rate_scale"),          # a synthetic key on a trace
    ("poisson", {"cv": 2.0}, "cv", None),                          # gamma's key on poisson
    ("gamma", {"path": "traces/x.csv"}, "path", None),             # a trace key on a synthetic workload
    ("trace", {"overlenght": "clip"}, "overlenght", "overlength"),
])
def test_keys_the_workload_kind_does_not_read_are_refused(kind, extra, key, meant):
    cfg = {**CONV} if kind == "trace" else {"kind": kind, "rate_rps": 5.0, "num_requests": 3,
                                             "lengths": {"kind": "fixed", "prompt_tokens": 8, "output_tokens": 2}}
    if kind == "gamma":
        cfg["cv"] = 1.5
    with pytest.raises(ConfigError) as err:
        build_workload({**cfg, **extra}, max_context_len=4096, rng=np.random.default_rng(0))
    message = str(err.value)
    hint = f" (did you mean workload.{meant}?)" if meant else ""
    assert message.startswith(f"workload.{key} is not a known key{hint}; known keys of workload with "
                              f"workload.kind={kind}: "), message


def test_a_trace_of_another_format_names_the_format_key(tmp_path):
    path = tmp_path / "mooncake.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2}\n')
    with pytest.raises(TraceError, match=r"this looks like a Mooncake trace \(JSON lines\): set workload\.format=mooncake$"):
        trace(path=str(path), format="csv")
    lengths = {"kind": "empirical", "path": str(path), "format": "azure"}
    with pytest.raises(TraceError, match=r"set workload\.lengths\.format=mooncake$"):
        build_workload({"kind": "poisson", "rate_rps": 1.0, "lengths": lengths}, max_context_len=4096,
                       rng=np.random.default_rng(0))


# --- requests longer than the model's context, through the real simulator -----------------------------

CONTEXT = 8192   # Llama-3-8B's max_context_len (the default model)
#: (prompt, output): over-length prompts, an output that overflows a prompt that fits, the exact boundary
LENGTHS = [(500, 100), (12_000, 50), (3000, 200), (8191, 1), (8000, 500), (9000, 1), (1200, 300), (8192, 1),
           (700, 7000), (4000, 4192), (4000, 4193), (100, 20)] * 3


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlength") / "long.csv"
    body = "".join(f"{0.25 * i},{p},{o}\n" for i, (p, o) in enumerate(LENGTHS))
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + body)
    return path


def _simulate(*overrides):
    """The real simulator (``simcolo.simulate``) on the project's config: (summary, requests by id)."""
    from conftest import run_sim

    result = run_sim(*overrides)
    return result.summary, result.requests().sort_values("request_id").reset_index(drop=True)


def _on(path) -> list[str]:
    return ["workload=trace", f"workload.path={path}", "workload.format=csv"]


def test_over_length_requests_are_refused_by_default_as_vllm_does(long_trace):
    over = [p + o > CONTEXT for p, o in LENGTHS]
    assert sum(over) == 15 and not all(over)
    s, req = _simulate(*_on(long_trace))
    assert s["num_requests"] == len(LENGTHS) and s["status_exceeds_context"] == sum(over)
    assert s["num_finished"] == len(LENGTHS) - sum(over) and s["workload_num_clipped"] == 0
    refused = req[req.status == "exceeds_context"]
    assert refused.request_id.tolist() == [i for i, o in enumerate(over) if o]
    # recorded as the trace has them, never scheduled, on no instance
    assert list(zip(refused.prompt_tokens, refused.output_tokens)) == [lo for lo, o in zip(LENGTHS, over) if o]
    assert refused.scheduled_s.isna().all() and refused.first_token_s.isna().all() and (refused.instance == -1).all()
    assert (req[req.status != "exceeds_context"].status == "finished").all()
    # the boundary: 8191 + 1 and 4000 + 4192 tokens fit exactly and are served
    assert req.loc[(req.prompt_tokens == 8191) & (req.output_tokens == 1), "status"].eq("finished").all()
    assert req.loc[(req.prompt_tokens == 4000) & (req.output_tokens == 4192), "status"].eq("finished").all()
    assert s["slo_attainment"] <= s["num_finished"] / s["num_requests"]


def test_clip_shortens_over_length_requests_to_fit(long_trace):
    s, req = _simulate(*_on(long_trace), "workload.overlength=clip")
    assert "status_exceeds_context" not in s
    assert s["num_requests"] == s["num_finished"] == len(LENGTHS)
    prompt = [min(p, CONTEXT - 1) for p, _ in LENGTHS]
    output = [min(o, CONTEXT - p) for p, (_, o) in zip(prompt, LENGTHS)]
    assert req.prompt_tokens.tolist() == prompt and req.output_tokens.tolist() == output
    changed = [(p, o) != lo for p, o, lo in zip(prompt, output, LENGTHS)]
    assert s["workload_num_clipped"] == sum(changed) == 15
    assert s["workload_num_prompt_clipped"] == sum(p > CONTEXT - 1 for p, _ in LENGTHS) == 9
    assert s["workload_num_output_clipped"] == sum(o > CONTEXT - p for p, (_, o) in zip(prompt, LENGTHS)) == 9


def test_a_trace_that_fits_the_context_is_served_the_same_in_both_modes():
    """The shipped conv trace's first 300 requests all fit Llama-3-8B: the mode changes nothing."""
    runs = [_simulate("workload.max_requests=300", f"workload.overlength={mode}") for mode in ("reject", "clip")]
    (s_reject, r_reject), (s_clip, r_clip) = runs
    assert s_reject == s_clip and s_reject["num_finished"] == 300 and s_reject["workload_num_clipped"] == 0
    pd.testing.assert_frame_equal(r_reject, r_clip)
