"""Small versions of the README's main job and the ``lemix_paper`` / ``harli_paper`` sweeps, whose results
are pinned in ``tests/data/pinned_runs.json``: a restructuring of the simulator must not move them.

``python tests/pinned_runs.py`` rewrites the pin file (do that only for a change that is meant to move
results, and say why in the commit).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

PIN_FILE = Path(__file__).parent / "data" / "pinned_runs.json"

_COMPARE = ["cluster=h100x8", "workload.max_requests=800"]
_LEMIX = ["cluster=h100x8", "workload=poisson", "workload.num_requests=300", "workload.rate_rps=16",
          "model=llama2-7b", "training.micro_batch=1", "training.seq_len=1024", "training.global_batch=32",
          "training.state_bytes_per_param=8", "training.data.kind=poisson", "training.data.share=0.5",
          "workload.overlength=clip"]
_HARLI = ["cluster=h100x8", "serving.max_batched_tokens=32768", "workload.rate_scale=2",
          "workload.max_requests=800"]

#: name -> overrides (the sweep's fixed settings, one point of its grid, and a short trace)
RUNS: dict[str, list[str]] = {
    **{f"compare/{p}": [*_COMPARE, f"policy={p}"] for p in ("isolated", "lemix", "harli", "tidal_lora")},
    "compare/lemix/lora": [*_COMPARE, "policy=lemix", "training=lora"],   # the same job as harli, as pipelines
    **{f"lemix_paper/{p}": [*_LEMIX, f"policy={p}"] for p in ("isolated", "mix_rr", "mix_luf", "mix_random",
                                                               "lemix", "tidal")},
    **{f"harli_paper/{p}/tpot{t}": [*_HARLI, f"policy={p}", f"slo.tpot_s={t}"]
       for p in ("static_share", "flexllm", "harli") for t in ("0.1", "0.025")},
    # serving alone (the default job, chunked prefill, disaggregation), under load so that batches
    # fill, preempt and queue
    **{f"serving/{s}": ["workload.max_requests=3000", "workload.rate_scale=4", "cluster=single",
                        f"serving={s}", "serving.num_gpu_blocks_override=1200", *extra]
       for s, extra in (("vllm", []), ("sarathi", []),
                        ("distserve", ["cluster=h100x4", "serving.prefill_instances=1",
                                       "serving.decode_instances=1"]))},
}


def _clean(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def pinned_result(overrides: list[str]) -> dict:
    """The run's summary, and digests of its per-request and per-step records."""
    from simcolo.config.compose import load_config
    from simcolo.costs import OffGridWarning
    from simcolo.simulate import simulate

    cfg = load_config(["metrics.plots=false", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffGridWarning)
        result = simulate(cfg)
    requests = result.requests()
    out = {k: _clean(v) for k, v in sorted(result.summary.items())}
    out["requests_sha256"] = hashlib.sha256(
        requests.drop(columns=[c for c in requests.columns if c == "instances"], errors="ignore")
        .to_csv(index=False, float_format="%.17g").encode()).hexdigest()
    if result.training is not None:
        out["training_sha256"] = hashlib.sha256(
            result.training.to_csv(index=False, float_format="%.17g").encode()).hexdigest()
    return out


if __name__ == "__main__":
    pins = {name: pinned_result(ov) for name, ov in RUNS.items()}
    PIN_FILE.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(pins)} pinned runs to {PIN_FILE}", file=sys.stderr)
