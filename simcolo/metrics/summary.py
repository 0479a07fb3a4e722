"""The run summary: flat keys named after vLLM's serving benchmark where one exists.

Latencies are ``<metric>_{mean,p50,p90,p99}_s``; a request *attains* the SLO only if it finished and
met both the TTFT and the TPOT target (TPOT does not apply to single-token outputs).
"""
from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {f"{name}_mean_s": float("nan"), **{f"{name}_p{p}_s": float("nan") for p in PERCENTILES}}
    out = {f"{name}_mean_s": float(values.mean())}
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[f"{name}_p{p}_s"] = float(v)
    return out


def serving_summary(records, itl, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    """Summary of a run's request records (a :class:`RequestSink`), reading one column at a time."""
    finished = records.status_is("finished")
    n = int(len(finished))
    n_done = int(finished.sum())
    arrival = records.column("arrival_s")
    start = float(arrival.min()) if n else 0.0
    del arrival
    finish = records.column("finish_s")[finished]
    end = float(finish.max()) if n_done else start
    del finish
    duration = max(end - start, 1e-12)
    summary = {"num_requests": n, "num_finished": n_done, "num_unfinished": n - n_done, "duration_s": duration}
    ttft = records.column("ttft_s")
    attained = finished & (ttft <= ttft_slo_s)
    summary.update(_stats("ttft", ttft[finished]))
    del ttft
    tpot = records.column("tpot_s")
    out_tokens = records.column("output_tokens")
    attained &= np.where(out_tokens > 1, tpot <= tpot_slo_s, True)  # TPOT does not apply to 1 token
    summary.update(_stats("tpot", tpot[finished]))
    del tpot
    summary.update(_stats("e2el", records.column("e2el_s")[finished]))
    out_sum = float(out_tokens[finished].sum())
    in_sum = float(records.column("prompt_tokens")[finished].sum())
    summary.update({
        "request_throughput_rps": n_done / duration,
        "output_token_throughput_tps": out_sum / duration,
        "total_token_throughput_tps": (in_sum + out_sum) / duration,
        "slo_ttft_s": ttft_slo_s,
        "slo_tpot_s": tpot_slo_s,
        "slo_attainment": float(attained.sum()) / n if n else float("nan"),
        "goodput_rps": float(attained.sum()) / duration,
        "num_preemptions": int(records.column("preemptions").sum()),
        "itl_mean_s": itl.mean(),
    })
    for p in PERCENTILES:
        summary[f"itl_p{p}_s"] = itl.percentile(p)
    return summary
