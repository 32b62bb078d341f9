"""The experiment engine: the loop, evaluation, checkpoints and resume, run-folder records, the wandb mirror.

Callable without Hydra: ``run`` takes a :class:`fsam.config.RunConfig` or a plain nested mapping.

    from fsam.engine import run
    summary = run({"run_dir": "runs/digits", "dataset": {"name": "digits"}, "trainer": {"epochs": 5}})
"""

from fsam.engine.checkpoint import CheckpointStore
from fsam.engine.evaluate import evaluate
from fsam.engine.loop import run
from fsam.runfolder import RunFolder
from fsam.engine.schedule import create_schedule, lr_factor

__all__ = ["CheckpointStore", "RunFolder", "create_schedule", "evaluate", "lr_factor", "run"]
