"""Benchmark scenarios: ``python -m simcolo.bench [scenario ...]``.

Each scenario runs in its own process (so its peak memory is its own) and prints one line ending in
``scenario=<name> requests_per_wall_s=<number> peak_rss_mib=<number>``. The wall time covers
``simulate`` (workload streaming, the SimPy model, writing requests.parquet and the summary),
not interpreter start-up, a 300-request warm-up run (first-use imports), or plots.

``colocated`` runs the full Azure conv trace on 8 H100s once per co-location policy (training
co-located, or on separate GPUs for ``isolated``), prints a ``policy=<name> ...`` line for each, and its
scenario line gives the slowest policy's figure (and the largest peak RSS).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "serving": ("Azure conv trace (19,366 requests, ~1 h) on 4 Llama-3-8B/H100 replicas",
                []),
    "serving_1m": ("1,000,000 Poisson requests at 20 req/s, conv-trace lengths, 4 Llama-3-8B/H100 replicas",
                   ["workload=poisson", "workload.rate_rps=20", "workload.num_requests=1000000",
                    "metrics.timeline_interval_s=60"]),
}


COLOCATED_POLICIES = ("isolated", "mix_rr", "mix_luf", "mix_random", "lemix", "harli", "static_share", "flexllm")
SCENARIOS["colocated"] = ("Azure conv trace (19,366 requests, ~1 h) on 8 H100s, Llama-3-8B, training co-located "
                          "(each policy)", ["cluster=h100x8"])


def _timed(overrides: list[str]):
    from simcolo.config.compose import load_config
    from simcolo.simulate import simulate

    with tempfile.TemporaryDirectory() as out:  # warm-up: first-use imports and caches, not timed
        simulate(load_config(overrides + ["metrics.plots=false", "workload.max_requests=300"]), out)
    cfg = load_config(overrides + ["metrics.plots=false"])
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = simulate(cfg, out)
        wall = time.perf_counter() - t0
    return result, wall


def run_colocated() -> None:
    description, overrides = SCENARIOS["colocated"]
    figures = []
    for policy in COLOCATED_POLICIES:
        result, wall = _timed(overrides + [f"policy={policy}"])
        s = result.summary
        rate = s["num_requests"] / wall
        figures.append(rate)
        print(f"policy={policy} requests_per_wall_s={rate:.0f} wall_s={wall:.2f} "
              f"train_tokens_per_s={s['train_tokens_per_s']:.0f} slo_attainment={s['slo_attainment']:.4f}", flush=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# {description}: slowest policy {COLOCATED_POLICIES[figures.index(min(figures))]}")
    print(f"scenario=colocated requests_per_wall_s={min(figures):.0f} peak_rss_mib={rss_mib:.0f}", flush=True)


def run_one(name: str) -> None:
    from simcolo.config.compose import load_config
    from simcolo.simulate import simulate

    if name == "colocated":
        run_colocated()
        return
    description, overrides = SCENARIOS[name]
    cfg = load_config(overrides + ["metrics.plots=false"])
    with tempfile.TemporaryDirectory() as out:  # warm-up: first-use imports and caches, not timed
        simulate(load_config(overrides + ["metrics.plots=false", "workload.max_requests=300"]), out)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = simulate(cfg, out)
        wall = time.perf_counter() - t0
    n = result.summary["num_requests"]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# {description}: {n} requests in {wall:.3f} s wall, "
          f"slo_attainment={result.summary['slo_attainment']:.4f}, iterations={result.summary['iterations']}")
    print(f"scenario={name} requests_per_wall_s={n / wall:.0f} peak_rss_mib={rss_mib:.0f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[],
                        help=f"which to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    if args.in_process:
        for name in names:
            run_one(name)
        return
    for name in names:
        subprocess.run([sys.executable, "-m", "simcolo.bench", "--in-process", name], check=True)


if __name__ == "__main__":
    main()
