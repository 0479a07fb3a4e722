"""Queueing theory check: one instance serving one request at a time, fixed lengths, Poisson
arrivals is an M/D/1 queue; its mean wait must match Pollaczek-Khinchine."""
import numpy as np
import pytest

from conftest import run_sim
from simcolo.costs import CostModel

PROMPT, OUTPUT = 200, 24


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_md1_mean_wait_matches_pollaczek_khinchine(rho):
    cost = CostModel.load(CostModel.resolve("h100-sxm", "llama3-8b", 1))
    service = cost.prefill_s(PROMPT, 1)
    for k in range(OUTPUT - 1):
        service += cost.decode_s(1, PROMPT + k)
    rate = rho / service
    n = 60_000
    result = run_sim("cluster=single", "workload=poisson", f"workload.rate_rps={rate}",
                     f"workload.num_requests={n}", "workload.lengths.kind=fixed",
                     f"workload.lengths.prompt_tokens={PROMPT}", f"workload.lengths.output_tokens={OUTPUT}",
                     "serving.max_num_seqs=1", "seed=1")
    df = result.requests()
    assert (df["status"] == "finished").all() and len(df) == n
    # every request's service takes exactly the deterministic service time
    np.testing.assert_allclose(df["finish_s"] - df["scheduled_s"], service, rtol=1e-9)
    wait = (df["scheduled_s"] - df["arrival_s"]).to_numpy()
    expected = rate * service**2 / (2 * (1 - rho))
    assert wait.mean() == pytest.approx(expected, rel=0.03)
