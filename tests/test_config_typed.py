"""The typed config (simcolo/config): every shipped config loads into a RunConfig; every bad value is refused
with one line naming its key. All on the real Hydra config (``load_config``)."""
import dataclasses
import itertools

import pytest
import yaml

from simcolo.config import (ClusterConfig, FullTraining, LearningCurveConfig, LengthsConfig, LoraFinetune, ReplayConfig,
                            RunConfig, TrainingData, WorkloadConfig)
from simcolo.config.compose import load_config
from simcolo.errors import ConfigError
from simcolo.hardware.environment import SimEnvironment
from simcolo.paths import CONF_DIR
from simcolo.replay.fidelity import DEFAULT_OVERRIDES, POLICY_OVERRIDES
from simcolo.serving.instance import BatchingConfig
from simcolo.serving.system import ServingLayout
from simcolo.training.data import TrainingStream
from simcolo.training.learning_curve import LearningCurve

GROUPS = ("cluster", "gpu", "model", "serving", "slo", "costs", "training", "workload", "policy")
CONFIG_NAMES = ("config", "replay")


def run_config(*overrides: str, config_name: str = "config") -> RunConfig:
    return RunConfig.from_cfg(load_config(list(overrides), config_name=config_name))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _yaml(path) -> dict:
    return yaml.safe_load(path.read_text())


def _policy_name(option: str) -> str:
    """``name`` of a policy option, or of the option it builds on (``tidal_lora``: ``tidal``'s)."""
    shipped = _yaml(CONF_DIR / "policy" / f"{option}.yaml")
    return shipped["name"] if "name" in shipped else _policy_name(shipped["defaults"][0])


def _fits_context(overrides) -> list[str]:
    """A prefill token budget that holds the chosen model's context (Qwen2.5: 32k; the default is 8k)."""
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "llama3-8b")
    ctx = _yaml(CONF_DIR / "model" / f"{model}.yaml")["max_context_len"]
    return [f"serving.max_batched_tokens={ctx}"] if ctx > 8192 else []


# ---------------------------------------------------------------------------------------------- shipped configs
def test_the_main_job_loads_as_documented():
    r = run_config()
    assert r.seed == 0 and r.model.name == "llama3-8b" and r.gpu.name == "h100-sxm"
    assert r.cluster == ClusterConfig(1, 4, 50e9, 5e-6, 2e-6) and r.cluster.num_gpus == 4
    assert r.serving.layout == ServingLayout("colocated", 1, None, 1, 3, 0.9, None)
    assert r.serving.batching == BatchingConfig(256, 8192, 16, False, 0.01, True)
    assert (r.slo.ttft_s, r.slo.tpot_s) == (1.0, 0.1)
    assert (r.costs.path, r.costs.tables_root, r.costs.interference) == (None, None, "table")
    assert (r.costs.interference_scale, r.costs.interference_scale_name) == (1.0, "default")
    assert r.training is None and r.training_kind == "none"
    assert (r.metrics.timeline_interval_s, r.metrics.plots, r.metrics.quiet) == (5.0, True, False)
    assert r.sim.max_time_s is None
    assert r.policy_name == "least_outstanding" and r.policy["name"] == "least_outstanding"
    assert r.workload == WorkloadConfig("trace", path="traces/AzureLLMInferenceTrace_conv.csv", format="azure")
    assert r.replay is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seed = 1


def test_the_replay_config_adds_its_keys():
    r = run_config(config_name="replay")
    assert r.replay == ReplayConfig(device="cpu", cpu_threads=1, warmup_iterations=3, isolated_trainer="auto",
                                    gil_switch_interval_s=None)
    assert dataclasses.replace(r, replay=None) == run_config()
    assert run_config("replay.gil_switch_interval_s=0.001", config_name="replay").replay.gil_switch_interval_s == 0.001


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_of_every_group_loads(group, option, config_name):
    overrides = [f"{group}={option}"]
    if (group, option) == ("workload", "trace"):   # any trace: the path is the user's (unset, it is refused)
        overrides.append("workload.path=traces/AzureLLMInferenceTrace_code.csv")
    r = run_config(*overrides, *_fits_context(overrides), config_name=config_name)
    shipped = _yaml(CONF_DIR / group / f"{option}.yaml")
    if group in ("gpu", "model"):
        assert getattr(r, group).name == option
    elif group == "policy":
        assert r.policy_name == _policy_name(option) == r.policy["name"]
    elif group == "training":
        assert r.training_kind == option
    elif group == "cluster":
        assert r.cluster.num_gpus == shipped["num_nodes"] * shipped["gpus_per_node"]
    elif group == "workload":
        assert r.workload.kind == shipped["kind"] and r.workload.overlength == shipped["overlength"]
        if option in ("poisson", "gamma"):
            assert r.workload.lengths == LengthsConfig("empirical", path="traces/AzureLLMInferenceTrace_conv.csv",
                                                       format="azure")
    assert (r.replay is not None) == (config_name == "replay")


def test_policies_bring_their_training_kind():
    assert isinstance(run_config("policy=lemix").training, FullTraining)
    assert isinstance(run_config("policy=isolated").training, FullTraining)
    lora = run_config("policy=harli").training
    assert isinstance(lora, LoraFinetune) and lora.kind == "lora" and not lora.activation_checkpointing
    assert (lora.rank, lora.micro_batch, lora.seq_len, lora.global_batch) == (16, 8, 1024, 8)
    assert lora.data == TrainingData("backlog", backlog=16) and lora.tokens_per_task == 8 * 1024
    full = run_config("policy=lemix").training
    assert (full.stages, full.micro_batch, full.seq_len, full.global_batch, full.schedule, full.max_inflight,
            full.state_bytes_per_param, full.activation_checkpointing) == (2, 4, 4096, 16, "1f1b", 2, 12.0, True)
    assert full.learning_curve == LearningCurveConfig("power", 2.6, 1.9, 50.0, 0.5)
    assert run_config("policy=lemix", "training=none").training is None


def _sweep_points(name: str) -> list[list[str]]:
    """``+sweep=<name>`` alone, then its sweeper's grid: every combination of the config groups it sweeps
    (policy, model), each value of the other keys (numbers) at least once, cycled over those points."""
    params = _yaml(CONF_DIR / "sweep" / f"{name}.yaml")["hydra"]["sweeper"]["params"]
    values = {k: str(v).split(",") for k, v in params.items()}
    groups = [k for k in values if (CONF_DIR / k).is_dir()]
    others = [k for k in values if k not in groups]
    combos = list(itertools.product(*(values[k] for k in groups)))
    n = max([len(combos)] + [len(values[k]) for k in others])
    points = [[f"+sweep={name}"]]
    for i in range(n):
        chosen = dict(zip(groups, combos[i % len(combos)]))
        chosen.update({k: values[k][i % len(values[k])] for k in others})
        points.append([f"+sweep={name}", *(f"{k}={v}" for k, v in chosen.items())])
    return points


@pytest.mark.parametrize("sweep", _options("sweep"))
def test_every_sweep_point_loads(sweep):
    points = _sweep_points(sweep)
    assert len(points) > 1
    for overrides in points:
        r = run_config(*overrides)
        assert r.cluster.num_gpus == 8
        for o in overrides[1:]:
            key, value = o.split("=")
            if key == "policy":
                assert r.policy_name == _policy_name(value)
            elif key == "model":
                assert r.model.name == value
            elif key == "training.data.share":
                assert r.training.data == TrainingData("poisson", share=float(value))


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
@pytest.mark.parametrize("policy", ["least_outstanding", "isolated", "lemix", "mix_rr"])
def test_the_fidelity_setting_loads_for_simulation_and_replay(config_name, policy):
    r = run_config("+fidelity=cpu_tiny", f"policy={policy}", *POLICY_OVERRIDES.get(policy, DEFAULT_OVERRIDES),
                   config_name=config_name)
    assert (r.model.name, r.gpu.name, r.metrics.timeline_interval_s) == ("tiny", "cpu", 1.0)
    if policy != "least_outstanding":
        assert (r.training.stages, r.training.micro_batch, r.training.seq_len, r.training.global_batch,
                r.training.state_bytes_per_param, r.training.activation_checkpointing) == (1, 2, 128, 4, 16.0, False)


def test_other_data_kinds_and_curves_load():
    assert run_config("policy=lemix", "training.data.kind=poisson", "training.data.rate_tps=2").training.data == \
        TrainingData("poisson", rate_tps=2.0)
    assert run_config("policy=lemix", "training.data.kind=jobs").training.data == \
        TrainingData("jobs", job_rate_per_s=0.01, job_tasks=1000)
    assert run_config("policy=lemix", "training.data.kind=requests").training.data == TrainingData("requests")
    assert run_config("policy=lemix", "training.data.backlog=0").training.data.backlog == 0  # serving alone
    curve = run_config("policy=lemix", "training.learning_curve.kind=table", "+training.learning_curve.path=cal")
    assert curve.training.learning_curve == LearningCurveConfig("table", path="cal")
    assert run_config("model=qwen2.5-7b", "serving=sarathi").serving.batching.chunked_prefill


def test_a_plain_dict_reads_the_same_and_errors_name_the_given_prefix():
    from omegaconf import OmegaConf

    cfg = load_config(["policy=harli"])
    plain = RunConfig.from_cfg(OmegaConf.to_container(cfg, resolve=True))
    typed = RunConfig.from_cfg(cfg)
    assert dataclasses.replace(plain, policy=None, workload=None) == dataclasses.replace(typed, policy=None,
                                                                                       workload=None)
    node = {"num_nodes": 2, "gpus_per_node": 0, "network_bandwidth_bytes_per_s": 1.0, "network_latency_s": 0.0,
            "nvlink_latency_s": 0.0}
    with pytest.raises(ConfigError, match=r"^clusters\.b\.gpus_per_node must be >= 1, got 0$"):
        ClusterConfig.from_cfg(node, "clusters.b")


# ---------------------------------------------------------------------------------------------- bad values
BAD = [
    # (overrides, config name, the message: it names the key)
    (["seed=abc"], "config", r"^seed must be an integer, got 'abc'$"),
    (["seed=1.5"], "config", r"^seed must be an integer, got 1\.5$"),
    (["seed=-1"], "config", r"^seed must be >= 0, got -1$"),
    (["+sedd=1"], "config", r"^sedd is not a known key \(did you mean seed\?\)"),
    (["cluster.num_nodes=0"], "config", r"^cluster\.num_nodes must be >= 1, got 0$"),
    (["cluster.network_bandwidth_bytes_per_s=-1"], "config", r"^cluster\.network_bandwidth_bytes_per_s must be > 0"),
    (["cluster.nvlink_latency_s=fast"], "config", r"^cluster\.nvlink_latency_s must be a number, got 'fast'$"),
    (["gpu.memory_bytes=-1"], "config", r"^gpu: key 'memory_bytes' must be > 0"),
    (["model.num_layers=0"], "config", r"^model: key 'num_layers' must be > 0"),
    (["+model.num_layer=3"], "config", r"^model: .*unknown \['num_layer'\]"),
    (["serving.tp=0"], "config", r"^serving\.tp must be >= 1, got 0$"),
    (["serving.mode=pipelined"], "config", r"^serving\.mode 'pipelined' is unknown"),
    (["serving.max_num_seqs=-3"], "config", r"^serving\.max_num_seqs must be >= 1, got -3$"),
    (["serving.block_size=2.5"], "config", r"^serving\.block_size must be an integer, got 2\.5$"),
    (["serving.watermark=1.0"], "config", r"^serving\.watermark must be in \[0, 1\), got 1$"),
    (["serving.gpu_memory_utilization=0"], "config", r"^serving\.gpu_memory_utilization must be in \(0, 1\]"),
    (["serving.num_gpu_blocks_override=0"], "config", r"^serving\.num_gpu_blocks_override must be >= 1 or null"),
    (["serving.chunked_prefill=maybe"], "config", r"^serving\.chunked_prefill must be true or false"),
    (["serving=distserve", "serving.prefill_instances=0"], "config",
     r"^serving\.prefill_instances and serving\.decode_instances must be >= 1 with serving\.mode=disaggregated"),
    (["+serving.max_num_seq=3"], "config",
     r"^serving\.max_num_seq is not a known key \(did you mean serving\.max_num_seqs\?\); known keys of serving: "
     r"block_size, .*max_num_seqs"),
    (["model=qwen2.5-7b"], "config", r"^serving\.max_batched_tokens=8192 is smaller than the model's max_context_len"),
    (["slo.tpot_s=-0.1"], "config", r"^slo\.tpot_s must be > 0, got -0\.1$"),
    (["costs.interference=measured"], "config", r"^costs\.interference 'measured' is unknown; expected table or none$"),
    (["costs.interference_scale=huge"], "config",
     r"^costs\.interference_scale 'huge' is unknown; expected a number >= 0 or one of: optimistic, default, pessimistic$"),
    (["costs.interference_scale=-1"], "config", r"^costs\.interference_scale must be >= 0, got -1$"),
    (["metrics.timeline_interval_s=0"], "config", r"^metrics\.timeline_interval_s must be > 0, got 0$"),
    (["sim.max_time_s=-5"], "config", r"^sim\.max_time_s must be > 0 or null, got -5$"),
    (["policy.name=nope"], "config", r"^policy\.name 'nope' is unknown"),
    (["+policy.sync_every=3"], "config",
     r"^policy\.sync_every is not a known key; known keys of policy \(least_outstanding\): name$"),
    (["policy=lemix", "+policy.alfa=0.2"], "config",
     (r"^policy\.alfa is not a known key \(did you mean policy\.alpha\?\); known keys of policy \(lemix\): alpha, "
      r"beta, decode_slo_fraction, defer_factor, expected_output_tokens, memory_threshold, name, release, tau$")),
    (["policy=static_share", "+policy.decode_slo_fraction=0.5"], "config",
     (r"^policy\.decode_slo_fraction is not a known key; known keys of policy \(static_share\): decode_instances, "
      r"decode_share, lookahead_iterations, max_micro_batch, name, prefill_instances$")),
    (["workload=trace"], "config", r"^workload\.path must be set: the trace file to read$"),
    (["workload.overlength=drop"], "config", r"^workload\.overlength 'drop' is unknown; expected one of: reject, clip$"),
    (["+workload.num_requests=5"], "config",
     (r"^workload\.num_requests is not a known key \(did you mean workload\.max_requests\?\); known keys of "
      r"workload with workload\.kind=trace: chunksize, end_s, format, kind, max_requests, overlength, path, "
      r"rate_scale, start_s$")),
    (["workload=gamma", "workload.kind=poisson"], "config",
     r"^workload\.cv is not a known key; known keys of workload with workload\.kind=poisson:"),
    (["workload.rate_scale=0"], "config", r"^workload\.rate_scale must be > 0, got 0$"),
    (["workload=poisson", "workload.lengths.kind=zipf"], "config",
     r"^workload\.lengths\.kind 'zipf' is unknown; expected one of: fixed, empirical, lognormal$"),
    (["training.kind=half"], "config", r"^training\.kind 'half' is unknown"),
    (["+training.lr=0.1"], "config", r"^training\.lr is not a known key"),
    (["policy=lemix", "training.micro_batch=-1"], "config", r"^training\.micro_batch must be >= 1, got -1$"),
    (["policy=lemix", "training.stages=0"], "config", r"^training\.stages must be >= 1, got 0$"),
    (["policy=lemix", "training.max_inflight=0"], "config", r"^training\.max_inflight must be >= 1, got 0$"),
    (["policy=lemix", "training.state_bytes_per_param=0"], "config", r"^training\.state_bytes_per_param must be > 0"),
    (["policy=isolated", "training.schedule=zigzag"], "config", r"^training\.schedule 'zigzag' is unknown"),
    (["policy=lemix", "training.activation_checkpointing=1"], "config",
     r"^training\.activation_checkpointing must be true or false, got 1$"),
    (["policy=harli", "training.rank=0"], "config", r"^training\.rank must be >= 1, got 0$"),
    (["policy=harli", "training.activation_checkpointing=true"], "config",
     r"^training\.activation_checkpointing=true is not modelled for LoRA finetuning"),
    (["policy=lemix", "training.data.kind=nope"], "config", r"^training\.data\.kind 'nope' is unknown"),
    (["policy=lemix", "training.data.backlog=-1"], "config", r"^training\.data\.backlog must be >= 0, got -1$"),
    (["policy=lemix", "training.data.kind=poisson"], "config",
     r"^training\.data\.kind=poisson needs exactly one of rate_tps and share, got rate_tps=None and share=None$"),
    (["policy=lemix", "training.data.kind=poisson", "training.data.rate_tps=1", "training.data.share=0.5"], "config",
     r"^training\.data\.kind=poisson needs exactly one of rate_tps and share"),
    (["policy=lemix", "training.data.kind=poisson", "training.data.share=1.0"], "config",
     r"^training\.data\.share must be in \(0, 1\), got 1$"),
    (["policy=lemix", "training.data.kind=poisson", "training.data.share=0"], "config",
     r"^training\.data\.share must be in \(0, 1\), got 0$"),
    (["policy=lemix", "training.data.kind=poisson", "training.data.rate_tps=-2"], "config",
     r"^training\.data\.rate_tps must be > 0, got -2$"),
    (["policy=lemix", "training.data.kind=jobs", "training.data.job_tasks=0"], "config",
     r"^training\.data\.job_tasks must be >= 1, got 0$"),
    (["policy=lemix", "+training.data.shares=0.5"], "config",
     r"^training\.data\.shares is not a known key \(did you mean training\.data\.share\?\)"),
    (["policy=lemix", "training.learning_curve.final_loss=3"], "config",
     r"^training\.learning_curve: expected initial_loss >= final_loss >= 0"),
    (["policy=lemix", "training.learning_curve.kind=spline"], "config",
     r"^training\.learning_curve\.kind 'spline' is unknown; expected power or table$"),
    (["policy=lemix", "training.learning_curve.kind=table"], "config", r"^training\.learning_curve\.path must name"),
    (["device=tpu"], "replay", r"^device='tpu'; expected cpu or cuda$"),
    (["+device=cpu"], "config", r"^device is not a known key"),
    (["replay.isolated_trainer=fork"], "replay",
     r"^replay\.isolated_trainer='fork'; expected auto, process or thread$"),
    (["device=cuda", "replay.isolated_trainer=process"], "replay",
     r"^replay\.isolated_trainer=process runs on the CPU only"),
    (["replay.cpu_threads=0"], "replay", r"^replay\.cpu_threads must be >= 1, got 0$"),
    (["+replay.warmup=3"], "replay",
     r"^replay\.warmup is not a known key \(did you mean replay\.warmup_iterations\?\)"),
]


@pytest.mark.parametrize("overrides, config_name, match", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_values_are_refused_naming_the_key(overrides, config_name, match):
    with pytest.raises(ConfigError, match=match) as info:
        run_config(*overrides, config_name=config_name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, match", [
    (["policy=lemix", "policy.release=later"], r"^policy\.release 'later' is unknown; expected one of: async, sync$"),
    (["policy=lemix", "policy.memory_threshold=1.5"], r"^policy\.memory_threshold must be in \(0, 1\], got 1\.5$"),
    (["policy=isolated", "policy.sync_every=0"], r"^policy\.sync_every must be >= 1, got 0$"),
    (["policy=isolated", "policy.serving_gpus=2.5"], r"^policy\.serving_gpus must be an integer, got 2\.5$"),
    (["policy=harli", "policy.max_micro_batch=many"], r"^policy\.max_micro_batch must be an integer, got 'many'$"),
    (["policy=static_share", "policy.decode_share=1"], r"^policy\.decode_share must be in \(0, 1\), got 1$"),
    (["policy=flexllm", "policy.decode_slo_fraction=0"], r"^policy\.decode_slo_fraction must be in \(0, 1\], got 0$"),
    (["policy=tidal", "policy.forecast_slow_s=5"],
     r"^policy\.forecast_slow_s=5 must be greater than policy\.forecast_fast_s=10$"),
    (["policy=tidal", "policy.feedback_quantile=0"], r"^policy\.feedback_quantile must be in \(0, 1\], got 0$"),
])
def test_each_policy_reads_its_knobs_typed(overrides, match):
    """A policy reads its own ``policy.*`` knobs (``make_policy``, before the run): each is checked like any key."""
    from simcolo.policies import make_policy

    with pytest.raises(ConfigError, match=match):
        make_policy(run_config(*overrides).policy)


def test_a_key_left_unset_is_named():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config(["policy=lemix"]))
    del cfg["training"]["data"]["backlog"]
    with pytest.raises(ConfigError, match=r"^training\.data\.backlog is missing$"):
        RunConfig.from_cfg(cfg)
    with pytest.raises(ConfigError, match=r"^slo\.ttft_s is missing$"):
        run_config("slo.ttft_s=???")
    with pytest.raises(ConfigError, match=r"^slo\.ttft_s cannot be read: Interpolation key 'nope' not found$"):
        run_config("slo.ttft_s=${nope}")
    assert run_config("slo.ttft_s=${slo.tpot_s}").slo.ttft_s == 0.1


# ---------------------------------------------------------------------------------------------- typed -> runtime
def test_learning_curve_and_stream_from_the_typed_config():
    cfg = load_config(["policy=lemix", "training.learning_curve.exponent=1.5", "training.data.kind=poisson",
                       "training.data.rate_tps=5", "training.micro_batch=2", "training.seq_len=64"])
    training = RunConfig.from_cfg(cfg).training
    steps = [0, 10, 100, 1000]
    # power law: final + (initial - final) / (1 + steps / scale) ** exponent, with full.yaml's 2.6, 1.9, 50
    want = [1.9 + 0.7 / (1 + s / 50.0) ** 1.5 for s in steps]
    assert LearningCurve.from_config(training.learning_curve).loss(steps).tolist() == pytest.approx(want)
    env, tasks = SimEnvironment(), []
    TrainingStream.from_config(env, training, 3, tasks.append)
    env.run(until=20)
    assert 50 < len(tasks) < 150 and {t.tokens for t in tasks} == {128}     # ~100 at 5 tasks/s
    assert training.tokens_per_task == 128
