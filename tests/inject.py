"""Run ``train.py`` with one fault injected, as a real process: ``python tests/inject.py FAULT [arguments]``.

The faults are the ones a cluster or a bad hyperparameter produces, made to happen on a CPU at a known step:

- ``nan_loss``: from the 3rd loss on, the loss (and so every gradient) is NaN, as in a diverging run.
- ``inf_once``: the 3rd loss is infinite (an fp16 overflow): its step must be skipped, the run goes on.
- ``out_of_memory``: the 2nd training step raises torch's out-of-memory error.
- ``no_wandb``: the wandb package cannot be imported.
- ``disk_full``: the 2nd checkpoint write runs out of space halfway (ENOSPC), as on a full disk.
- ``stop_at``: the 3rd training step sends this process SIGTERM, as a scheduler preempting a job does.
- ``read_only``: from the 5th training step on, files under $FSAM_RUNS cannot be opened for writing (EROFS), as
  when a file system is remounted read-only (the tests run as root, for whom chmod does not stop writes).
"""

from __future__ import annotations

import builtins
import errno
import os
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _loss_after(calls: int, factor: float, *, once: bool) -> None:
    forward = torch.nn.CrossEntropyLoss.forward
    count = [0]

    def faulty(self, logits, targets):
        loss = forward(self, logits, targets)  # the engine's training loss (evaluation uses F.cross_entropy)
        count[0] += 1
        hit = count[0] == calls if once else count[0] >= calls
        return loss * factor if hit else loss

    torch.nn.CrossEntropyLoss.forward = faulty


def _out_of_memory_at(step: int) -> None:
    import fsam.engine.loop as loop

    real, count = loop.train_step, [0]

    def faulty(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    loop.train_step = faulty


def _disk_full_at(call: int) -> None:
    real, count = torch.save, [0]

    def faulty(obj, file, *args, **kwargs):
        count[0] += 1
        if count[0] == call:
            file.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, file, *args, **kwargs)

    torch.save = faulty


def _read_only_from(step: int) -> None:
    import fsam.engine.loop as loop

    runs = os.path.realpath(os.environ["FSAM_RUNS"])
    real_open, real_step, count = builtins.open, loop.train_step, [0]

    def guarded_open(file, mode="r", *args, **kwargs):
        writing = any(flag in mode for flag in "wax+")
        if writing and os.path.realpath(os.fspath(file)).startswith(runs + os.sep):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    def counting_step(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            builtins.open = guarded_open
        return real_step(*args, **kwargs)

    loop.train_step = counting_step


def _terminate_at(step: int) -> None:
    import signal

    import fsam.engine.loop as loop

    real, count = loop.train_step, [0]

    def stepping(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    loop.train_step = stepping


def main() -> int:
    fault, arguments = sys.argv[1], sys.argv[2:]
    if fault == "nan_loss":
        _loss_after(3, float("nan"), once=False)
    elif fault == "inf_once":
        _loss_after(3, float("inf"), once=True)
    elif fault == "out_of_memory":
        _out_of_memory_at(2)
    elif fault == "disk_full":
        _disk_full_at(2)
    elif fault == "read_only":
        _read_only_from(5)
    elif fault == "stop_at":
        _terminate_at(3)
    elif fault == "no_wandb":
        sys.modules["wandb"] = None  # import wandb raises ImportError
    else:
        raise SystemExit(f"unknown fault {fault}")
    sys.argv = [str(REPO / "train.py"), *arguments]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")  # exits with train.py's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
