"""Fast advance (many decode iterations per event) must equal the plain one-event-per-iteration mode
exactly, on slices of the real Azure traces, across batching modes and under memory pressure."""
import pandas as pd
import pytest

from conftest import run_sim

CASES = {
    "conv, 4 replicas": ["workload.max_requests=1500"],
    "conv 4x rate, 1 replica": ["workload.max_requests=800", "workload.rate_scale=4", "serving.num_instances=1"],
    "code trace, bursty": ["workload=azure_code", "workload.max_requests=800", "serving.num_instances=2"],
    "preemption (small KV)": ["workload.max_requests=700", "workload.rate_scale=3", "serving.num_instances=1",
                              "serving.num_gpu_blocks_override=900"],
    "chunked prefill + preemption": ["serving=sarathi", "workload.max_requests=700", "workload.rate_scale=3",
                                     "serving.num_instances=1", "serving.num_gpu_blocks_override=900"],
    "disaggregated + preemption": ["serving=distserve", "workload.max_requests=700", "workload.rate_scale=3",
                                   "serving.num_gpu_blocks_override=900"],
    "round robin, max_num_seqs": ["policy=round_robin", "workload.max_requests=700", "workload.rate_scale=6",
                                  "serving.max_num_seqs=8"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_fast_advance_equals_iteration_by_iteration(overrides):
    fast = run_sim("serving.fast_advance=true", *overrides)
    slow = run_sim("serving.fast_advance=false", *overrides)
    a, b = fast.requests(), slow.requests()
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert fast.summary["iterations"] == slow.summary["iterations"]
    for key in ("itl_mean_s", "itl_p50_s", "itl_p99_s", "num_preemptions"):
        assert fast.summary[key] == pytest.approx(slow.summary[key], rel=1e-12), key
    assert (a["status"] == "finished").all()


def test_preemption_cases_do_preempt():
    """The memory-pressure cases above must actually exercise preemption, or they prove nothing."""
    for name in ("preemption (small KV)", "chunked prefill + preemption", "disaggregated + preemption"):
        assert run_sim(*CASES[name]).summary["num_preemptions"] > 0, name
