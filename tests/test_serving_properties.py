"""Property-based checks over random small serving configurations (hypothesis drives the real model):
every request is accounted for exactly once, and KV memory never goes over capacity."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_sim

configs = st.fixed_dictionaries({
    "serving": st.sampled_from(["vllm", "sarathi", "distserve"]),
    "blocks": st.integers(60, 1500),
    "max_num_seqs": st.integers(1, 64),
    "rate": st.floats(0.5, 40.0),
    "n": st.integers(20, 120),
    "policy": st.sampled_from(["round_robin", "least_outstanding"]),
    "seed": st.integers(0, 2**16),
    "fast": st.booleans(),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_conservation_and_kv_capacity(c):
    result = run_sim(f"serving={c['serving']}", f"serving.num_gpu_blocks_override={c['blocks']}",
                     f"serving.max_num_seqs={c['max_num_seqs']}", "workload=poisson",
                     f"workload.rate_rps={c['rate']}", f"workload.num_requests={c['n']}",
                     f"policy={c['policy']}", f"seed={c['seed']}", f"serving.fast_advance={c['fast']}",
                     "metrics.timeline_interval_s=0.05")
    df = result.requests()
    # every request appears exactly once, finished or with a reason
    assert sorted(df["request_id"]) == list(range(c["n"]))
    assert set(df["status"]) <= {"finished", "exceeds_kv_capacity", "exceeds_context"}
    # refused exactly when longer than the model's context (checked first, as vLLM's API server does) ...
    context = result.backend.model.max_context_len
    over = df["prompt_tokens"] + df["output_tokens"] > context
    assert ((df["status"] == "exceeds_context") == over).all()
    # ... else rejected exactly when its final KV (prompt + output - 1 tokens) cannot fit beside the watermark
    usable_blocks = c["blocks"] - int(0.01 * c["blocks"])
    final_blocks = -(-(df["prompt_tokens"] + df["output_tokens"] - 1) // 16)
    assert ((df["status"] == "exceeds_kv_capacity") == (~over & (final_blocks > usable_blocks))).all()
    done = df[df["status"] == "finished"]
    assert (done["first_token_s"] >= done["arrival_s"]).all() and (done["finish_s"] >= done["first_token_s"]).all()
    # KV never over capacity (sampled every 50 ms; the instance also checks at every decode run)
    system = result.system
    assert (result.timeline["kv_blocks_used"] <= system.kv_budget.num_blocks).all()
    assert (result.timeline["memory_used_bytes"] <= result.timeline["memory_capacity_bytes"]).all()
    for inst in system.instances:  # everything handed back at the end
        assert inst.free_blocks == inst.num_blocks and not inst.running and not inst.waiting
    for gpu in system.cluster.gpus:
        assert gpu.memory.peak <= gpu.memory.capacity


def test_cut_off_run_reports_every_request():
    """A run stopped by sim.max_time_s still accounts for every request of the workload."""
    result = run_sim("workload.max_requests=2000", "sim.max_time_s=120")
    df = result.requests()
    assert sorted(df["request_id"]) == list(range(2000))
    counts = df["status"].value_counts()
    assert counts["unfinished_at_end"] > 0 and counts["not_arrived_before_end"] > 0
    assert counts.sum() == 2000
    late = df[df["status"] == "not_arrived_before_end"]
    assert (late["arrival_s"] >= 120).all()
    assert np.isnan(late["first_token_s"]).all()
