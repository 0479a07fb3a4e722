"""Benchmark scenarios: ``python -m simcolo.bench [scenario ...]``.

Each scenario runs in its own process (so its peak memory is its own) and ends in one line
``scenario=<name> requests_per_wall_s=<number> ratio_to_reference=<number> ... peak_rss_mib=<number>``.
The wall time covers ``simulate`` (workload streaming, the SimPy model, writing requests.parquet and the
summary), not interpreter start-up, a 300-request warm-up run (first-use imports), or plots; in
``sparse_week``, the fastest of three runs each (``REPEATS``).

Absolute speeds differ by up to 4x between machines of the same kind, so every scenario also times, in
its own process just before it, the **reference loop** (:func:`reference_loop`) and prints its own speed as
a ratio to it (``ratio_to_reference``). Ratios between scenarios (co-located against serving alone) are
measured in one process too. The targets, as ratios:

* ``serving`` (and ``serving_1m``) — requests per wall second >= 0.3x the reference loop's;
* ``colocated`` — each co-location policy >= 0.7x the speed of the same policy's layout serving the same
  trace alone (``training=none``), ``ratio_to_serving``;
* ``sparse_week`` — ~100 requests spread over 7 simulated days with training beside: wall time <= 3x the
  same layout serving them alone, for every co-location policy (``wall_ratio_to_serving``);
* ``overloaded`` — the whole conversation trace at 4x its rate on one GPU (the queue grows without
  bound): requests per wall second >= 0.5x the four-replica ``serving`` scenario's (``ratio_to_serving``).
"""
from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque

COLOCATED_POLICIES = ("isolated", "mix_rr", "mix_luf", "mix_random", "lemix", "harli", "static_share", "flexllm", "tidal",
                      "tidal_lora")
_SPARSE_WEEK = ["cluster=h100x8", "workload=poisson", "workload.rate_rps=0.000165", "workload.num_requests=100",
                "metrics.timeline_interval_s=600"]

SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "serving": ("Azure conv trace (19,366 requests, ~1 h) on 4 Llama-3-8B/H100 replicas", []),
    "serving_1m": ("1,000,000 Poisson requests at 20 req/s, conv-trace lengths, 4 Llama-3-8B/H100 replicas",
                   ["workload=poisson", "workload.rate_rps=20", "workload.num_requests=1000000",
                    "metrics.timeline_interval_s=60"]),
    "colocated": (("Azure conv trace (19,366 requests, ~1 h) on 8 H100s, Llama-3-8B, training co-located "
                   "(each policy, against its layout serving alone)"), ["cluster=h100x8"]),
    "sparse_week": (("100 Poisson requests over ~7 days on 8 H100s with training beside (each policy, against "
                     "its layout serving alone)"), _SPARSE_WEEK),
    "overloaded": (("Azure conv trace at 4x its rate on one Llama-3-8B/H100 (overloaded), against the "
                    "4-replica serving scenario"), ["cluster=single", "workload.rate_scale=4"]),
}


# ---------------------------------------------------------------------- the reference loop
def reference_loop(arrival_s, prompt_tokens, output_tokens, replicas: int = 4, max_seqs: int = 256) -> int:
    """A bare SimPy continuous-batching loop, the yardstick every scenario is divided by.

    Model: requests go round-robin to ``replicas`` servers; each server is a SimPy process running one
    iteration per ``env.timeout``: it admits waiting requests first-come first-served up to ``max_seqs``
    sequences, the iteration takes ``5 ms + 0.1 ms x batch + 0.02 ms x prompt tokens admitted``, and then
    every running request gets one token (a Python loop over the batch: the per-token work). No KV paging,
    no metrics, no fast advance. Returns the number of requests finished."""
    import simpy

    env = simpy.Environment()
    waiting = [deque() for _ in range(replicas)]
    wake = [None] * replicas
    finished = [0]

    def server(i: int):
        running: list[list[int]] = []
        queue = waiting[i]
        while True:
            if not running and not queue:
                wake[i] = env.event()
                yield wake[i]
            admitted = 0
            while queue and len(running) < max_seqs:
                prompt, output = queue.popleft()
                admitted += prompt
                running.append([output])
            yield env.timeout(0.005 + 1e-4 * len(running) + 2e-5 * admitted)
            still = []
            for seq in running:
                seq[0] -= 1
                if seq[0] > 0:
                    still.append(seq)
                else:
                    finished[0] += 1
            running = still

    def arrivals():
        now = 0.0
        for k, (at, p, o) in enumerate(zip(arrival_s, prompt_tokens, output_tokens)):
            if at > now:
                yield env.timeout(at - now)
                now = at
            i = k % replicas
            waiting[i].append((int(p), max(int(o), 1)))
            if wake[i] is not None and not wake[i].triggered:
                wake[i].succeed()

    for i in range(replicas):
        env.process(server(i))
    env.process(arrivals())
    env.run()
    return finished[0]


def time_reference() -> float:
    """Requests per wall second of :func:`reference_loop` on the conversation trace (timed here, now)."""
    import numpy as np

    from simcolo.paths import resolve_path
    from simcolo.workload.loaders import read_trace

    chunks = list(read_trace(resolve_path("traces/AzureLLMInferenceTrace_conv.csv"), "azure"))
    arrival = np.concatenate([c["arrival_s"].to_numpy() for c in chunks])
    prompt = np.concatenate([c["prompt_tokens"].to_numpy() for c in chunks])
    output = np.concatenate([c["output_tokens"].to_numpy() for c in chunks])
    arrival = (arrival - arrival[0]).tolist()
    t0 = time.perf_counter()
    n = reference_loop(arrival, prompt.tolist(), output.tolist())
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------- timed runs
def _timed(overrides: list[str], repeats: int = 1):
    """(summary, wall seconds) of one simulation; with ``repeats`` > 1 the fastest of that many runs (another
    process on the machine only ever adds time: this is how runs of a fraction of a second are compared)."""
    from simcolo.config.compose import load_config
    from simcolo.simulate import simulate

    with tempfile.TemporaryDirectory() as out:  # warm-up: first-use imports and caches, not timed
        simulate(load_config(overrides + ["metrics.plots=false", "workload.max_requests=300"]), out)
    cfg = load_config(overrides + ["metrics.plots=false"])
    wall = math.inf
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = simulate(cfg, out)
            wall = min(wall, time.perf_counter() - t0)
    return result.summary, wall


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: Runs per timing, the fastest kept: a sparse week's runs take a fraction of a second, where one slow run
#: moves a ratio by 2x; the co-located scenario's take seconds each.
REPEATS = {"colocated": 1, "sparse_week": 3}


def _against_serving_alone(name: str, policies: tuple[str, ...], reference: float) -> None:
    """Each policy with training, then its layout serving alone (``training=none``), same trace."""
    description, overrides = SCENARIOS[name]
    repeats = REPEATS[name]
    worst = None
    for policy in policies:
        s, wall = _timed(overrides + [f"policy={policy}"], repeats)
        _, alone = _timed(overrides + [f"policy={policy}", "training=none"], repeats)
        rate = s["num_requests"] / wall
        ratio = alone / wall   # speed ratio: co-located requests/s over serving-alone requests/s
        print(f"policy={policy} requests_per_wall_s={rate:.0f} wall_s={wall:.2f} serving_alone_wall_s={alone:.2f} "
              f"ratio_to_serving={ratio:.2f} wall_ratio_to_serving={wall / alone:.2f} "
              f"train_tokens_per_s={s['train_tokens_per_s']:.0f} slo_attainment={s['slo_attainment']:.4f} "
              f"repeats={repeats}",
              flush=True)
        if worst is None or ratio < worst[1]:
            worst = (policy, ratio, rate)
    print(f"# {description}: slowest against serving alone: {worst[0]}")
    print(f"scenario={name} requests_per_wall_s={worst[2]:.0f} ratio_to_reference={worst[2] / reference:.3f} "
          f"ratio_to_serving={worst[1]:.2f} wall_ratio_to_serving={1 / worst[1]:.2f} "
          f"reference_requests_per_wall_s={reference:.0f} peak_rss_mib={_rss_mib():.0f}", flush=True)


def run_one(name: str, policies: tuple[str, ...]) -> None:
    reference = time_reference()
    if name in ("colocated", "sparse_week"):
        _against_serving_alone(name, policies, reference)
        return
    description, overrides = SCENARIOS[name]
    s, wall = _timed(overrides)
    rate = s["num_requests"] / wall
    extra = ""
    if name == "overloaded":
        s4, wall4 = _timed(SCENARIOS["serving"][1])
        extra = f"ratio_to_serving={rate / (s4['num_requests'] / wall4):.2f} "
    print(f"# {description}: {s['num_requests']} requests in {wall:.3f} s wall, "
          f"slo_attainment={s['slo_attainment']:.4f}, iterations={s['iterations']}, "
          f"preemptions={s['num_preemptions']}")
    print(f"scenario={name} requests_per_wall_s={rate:.0f} ratio_to_reference={rate / reference:.3f} {extra}"
          f"reference_requests_per_wall_s={reference:.0f} peak_rss_mib={_rss_mib():.0f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[],
                        help=f"which to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--policies", default=",".join(COLOCATED_POLICIES),
                        help="co-location policies for colocated and sparse_week (comma-separated)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    policies = tuple(p for p in args.policies.split(",") if p)
    unknown = sorted(set(policies) - set(COLOCATED_POLICIES))
    if unknown:
        parser.error(f"--policies: unknown {', '.join(unknown)}; expected some of {', '.join(COLOCATED_POLICIES)}")
    names = args.scenarios or list(SCENARIOS)
    if args.in_process:
        for name in names:
            run_one(name, policies)
        return
    for name in names:
        subprocess.run([sys.executable, "-m", "simcolo.bench", "--in-process", f"--policies={args.policies}", name],
                       check=True)


if __name__ == "__main__":
    main()
