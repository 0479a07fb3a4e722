"""Typed config, read once at the edge: ``RunConfig.from_cfg(cfg)`` turns the composed Hydra config into
frozen dataclasses, one per group, each cast and validated where it is read (``simcolo.config.compose.load_config``
composes the config; this package reads it)."""
from simcolo.config.groups import ClusterConfig, CostsConfig, MetricsConfig, ReplayConfig, SimConfig, SloConfig
from simcolo.config.run import RunConfig
from simcolo.config.serving import ServingConfig
from simcolo.config.training import (FullTraining, LearningCurveConfig, LoraFinetune, Training, TrainingData,
                                     training_from_cfg)
from simcolo.config.workload import LengthsConfig, WorkloadConfig

__all__ = ["RunConfig", "ClusterConfig", "ServingConfig", "SloConfig", "CostsConfig", "MetricsConfig", "SimConfig",
           "ReplayConfig", "TrainingData", "LearningCurveConfig", "FullTraining", "LoraFinetune", "Training",
           "training_from_cfg", "WorkloadConfig", "LengthsConfig"]
