"""The training data stream's kinds, on the real SimPy environment and in real runs."""
import numpy as np
import pytest

from conftest import run_sim
from simcolo.config.training import LearningCurveConfig, TrainingData
from simcolo.errors import ConfigError
from simcolo.hardware.environment import SimEnvironment
from simcolo.training.data import TrainingStream
from simcolo.training.learning_curve import LearningCurve


def _cfg(**kw):
    base = {"kind": "backlog", "backlog": 4, "rate_tps": None, "share": None, "job_rate_per_s": 0.1, "job_tasks": 5}
    base.update(kw)
    return TrainingData.from_cfg(base)


def test_backlog_keeps_n_tasks_outstanding():
    env = SimEnvironment()
    got = []
    stream = TrainingStream(env, _cfg(backlog=3), 2, 128, seed=0, on_task=got.append)
    env.run(until=1)
    assert len(got) == 3 and all(t.tokens == 256 for t in got)
    stream.task_done(got[0])
    assert len(got) == 4 and stream.completed == 1


def test_jobs_arrive_with_their_tasks_and_poisson_rate_is_respected():
    env = SimEnvironment()
    got = []
    TrainingStream(env, _cfg(kind="jobs", job_rate_per_s=0.5, job_tasks=5), 1, 64, seed=1, on_task=got.append)
    env.run(until=200)
    jobs = {t.job for t in got}
    assert len(got) == 5 * len(jobs) and 0 in jobs
    assert 60 < len(jobs) < 140            # ~100 expected over 200 s at 0.5 jobs/s
    env = SimEnvironment()
    got = []
    TrainingStream(env, _cfg(kind="poisson", rate_tps=10.0), 1, 64, seed=2, on_task=got.append)
    env.run(until=100)
    assert 900 < len(got) < 1100
    gaps = np.diff([t.arrival_s for t in got])
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)   # exponential gaps


def test_share_of_tasks_and_requests_as_training_data_in_real_runs():
    share = run_sim("policy=lemix", "cluster=h100x8", "workload.max_requests=2000", "training.data.kind=poisson",
                    "training.data.share=0.75")
    created = share.summary["train_tasks_created"]
    assert created / (created + 2000) == pytest.approx(0.75, abs=0.02)
    served = run_sim("policy=mix_rr", "cluster=h100x8", "workload.max_requests=600", "training.data.kind=requests",
                     "training.micro_batch=1", "training.seq_len=2048")
    req = served.requests()
    done = req[req.status == "finished"]
    # every finished request's tokens are packed into 2048-token tasks (the remainder waits for more)
    assert served.summary["train_tasks_created"] == int((done.prompt_tokens + done.output_tokens).sum()) // 2048


def test_bad_stream_settings_are_named():
    with pytest.raises(ConfigError, match="exactly one of rate_tps and share"):
        _cfg(kind="poisson")
    with pytest.raises(ConfigError, match=r"training.data.share must be in \(0, 1\)"):
        _cfg(kind="poisson", share=1.0)


def test_learning_curve_power_law():
    curve = LearningCurve.from_config(LearningCurveConfig.from_cfg(
        {"kind": "power", "initial_loss": 3.0, "final_loss": 1.0, "steps_scale": 10.0, "exponent": 1.0}))
    assert curve.loss([0, 10, 90]).tolist() == pytest.approx([3.0, 2.0, 1.2])
