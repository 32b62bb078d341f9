"""The typed schema of a run and its validation; no Hydra here, a plain mapping is enough.

    from fsam.config import load_config
    config = load_config({"run_dir": "runs/try", "trainer": {"epochs": 2}})   # RunConfig, every value checked
"""

from fsam.config.schema import (
    AugmentConfig,
    DatasetConfig,
    LoggerConfig,
    ModelConfig,
    NoiseConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    TrainerConfig,
)
from fsam.config.validate import load_config, to_plain

__all__ = [
    "AugmentConfig",
    "DatasetConfig",
    "LoggerConfig",
    "ModelConfig",
    "NoiseConfig",
    "OptimizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "load_config",
    "to_plain",
]
