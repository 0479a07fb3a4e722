"""The run summary: flat keys named after vLLM's serving benchmark where one exists.

Latencies are ``<metric>_{mean,p50,p90,p99}_s``; a request *attains* the SLO only if it finished and
met both the TTFT and the TPOT target (TPOT does not apply to single-token outputs).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PERCENTILES = (50, 90, 99)


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {f"{name}_mean_s": float("nan"), **{f"{name}_p{p}_s": float("nan") for p in PERCENTILES}}
    out = {f"{name}_mean_s": float(values.mean())}
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[f"{name}_p{p}_s"] = float(v)
    return out


def serving_summary(table: pa.Table, itl, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in
           ("arrival_s", "finish_s", "ttft_s", "tpot_s", "e2el_s", "prompt_tokens", "output_tokens",
            "preemptions")}
    finished = pc.equal(table.column("status"), "finished").to_numpy(zero_copy_only=False)
    n = int(len(finished))
    start = float(col["arrival_s"].min()) if n else 0.0
    end = float(np.nanmax(col["finish_s"])) if finished.any() else start
    duration = max(end - start, 1e-12)
    tpot_ok = np.where(col["output_tokens"] > 1, col["tpot_s"] <= tpot_slo_s, True)
    attained = finished & (col["ttft_s"] <= ttft_slo_s) & tpot_ok
    out_tokens = float(col["output_tokens"][finished].sum())
    in_tokens = float(col["prompt_tokens"][finished].sum())
    summary = {
        "num_requests": n,
        "num_finished": int(finished.sum()),
        "num_unfinished": int(n - finished.sum()),
        "duration_s": duration,
        "request_throughput_rps": float(finished.sum()) / duration,
        "output_token_throughput_tps": out_tokens / duration,
        "total_token_throughput_tps": (in_tokens + out_tokens) / duration,
        "slo_ttft_s": ttft_slo_s,
        "slo_tpot_s": tpot_slo_s,
        "slo_attainment": float(attained.sum()) / n if n else float("nan"),
        "goodput_rps": float(attained.sum()) / duration,
        "num_preemptions": int(col["preemptions"].sum()),
    }
    for name in ("ttft", "tpot", "e2el"):
        summary.update(_stats(name, col[f"{name}_s"][finished]))
    summary["itl_mean_s"] = itl.mean()
    for p in PERCENTILES:
        summary[f"itl_p{p}_s"] = itl.percentile(p)
    return summary
