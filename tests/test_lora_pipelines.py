"""The same job on every layout: LoRA finetuning as a pipeline (isolated and the co-located pipeline
policies), beside the finetune layout's LoRA on decode GPUs -- stage costs, memory, syncs and the
job-neutral training work, on the real simulator and tables."""
import pytest

from conftest import run_sim
from simcolo.config.compose import load_config
from simcolo.config.run import RunConfig
from simcolo.errors import ConfigError
from simcolo.metrics.training_summary import train_flops_per_token
from simcolo.policies import make_policy
from simcolo.replay.backend import check_live
from simcolo.training.memory import full_training_stage_memory, lora_params, stage_matmul_fraction

SLICE = ["cluster=h100x8", "workload.max_requests=400", "workload.rate_scale=2"]


@pytest.mark.parametrize("policy", ["isolated", "lemix", "mix_rr"])
def test_lora_runs_as_a_pipeline_on_every_pipeline_layout(policy):
    r = run_sim(f"policy={policy}", "training=lora", *SLICE)
    s, plan = r.summary, r.backend.plan
    assert s["train_job"] == "lora" and s["train_tokens_per_s"] > 0 and s["optimizer_steps"] > 0
    model = r.backend.model
    rank = r.backend.training.rank
    # the job-neutral unit counts LoRA's work (4N + 6 N_adapter per token), not full training's 6N
    per_token = train_flops_per_token(model, "lora", rank)
    assert s["train_flops_per_s"] == pytest.approx(per_token * s["train_tokens_per_s"])
    assert 0.66 < per_token / train_flops_per_token(model, "full") < 0.68
    # a stage's task costs are the whole model's LoRA step split by the stages' matmul work
    pred, S = plan.predictor, 2
    tc, t = pred.tc, r.backend.training
    for phase in ("forward", "backward"):
        whole = tc.lora_s(rank, phase, t.micro_batch, t.seq_len)
        costs = pred.stage_costs(S, phase)
        assert sum(costs) == pytest.approx(whole)
        assert costs[1] / costs[0] == pytest.approx(stage_matmul_fraction(model, S, 1) / stage_matmul_fraction(model, S, 0))
    assert sum(pred.stage_costs(S, "optimizer")) == pytest.approx(pred.lora_optimizer_s())
    assert list(plan.trainer.forward_s) == pred.task_forward_s(S)


def test_lora_pipelines_hold_less_memory_and_sync_less_than_full_training():
    full = run_sim("policy=isolated", "training=full", *SLICE, "workload.max_requests=50")
    lora = run_sim("policy=isolated", "training=lora", *SLICE, "workload.max_requests=50")
    model = full.backend.model
    # the weight sync sends the adapters (bf16), not the model
    ratio = lora.backend.plan.trainer.sync_s / full.backend.plan.trainer.sync_s
    assert ratio < 0.02
    # the last stage's memory: frozen weights alike; the adapters' state instead of grads + Adam
    def state(r):
        return {a.use: a.nbytes for a in r.backend.plan.allocations if a.gpu == 7}
    assert state(lora)["weights"] == state(full)["weights"]
    assert state(lora)["train_state"] == pytest.approx(
        lora_params(model, lora.backend.training.rank) / 2 * 12.0)   # half the layers on stage 1 of 2
    assert state(lora)["train_state"] < 0.01 * state(full)["train_state"]
    # activations: LoRA back-propagates through the frozen base without checkpointing, so a task holds
    # what a full-training task without checkpointing holds
    t = lora.backend.training
    assert lora.backend.plan.trainer.activation_bytes == tuple(
        full_training_stage_memory(model, 2, s, t.micro_batch, t.seq_len, 12, checkpointing=False).activation_bytes
        for s in range(2))


def test_the_live_replay_refuses_lora_pipelines_naming_what_it_runs():
    cfg = load_config(["+fidelity=cpu_tiny", "policy=lemix", "training=lora"], config_name="replay")
    run = RunConfig.from_cfg(cfg)
    with pytest.raises(ConfigError, match=r"training=lora with policy=lemix: LoRA finetuning as a pipeline is simulated"):
        check_live(run, make_policy(run.policy))
