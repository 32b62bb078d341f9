"""Run ``train.py`` with one fault injected, as a real process: ``python tests/inject.py FAULT [arguments]``.

The faults are the ones a cluster or a bad hyperparameter produces, made to happen on a CPU at a known step:

- ``nan_loss``: from the 3rd loss on, the loss (and so every gradient) is NaN, as in a diverging run.
- ``inf_once``: the 3rd loss is infinite (an fp16 overflow): its step must be skipped, the run goes on.
- ``out_of_memory``: the 2nd training step raises torch's out-of-memory error.
- ``no_wandb``: the wandb package cannot be imported.
- ``disk_full``: the 2nd checkpoint write runs out of space halfway (ENOSPC), as on a full disk.
- ``stop_at``: the 3rd training step sends this process SIGTERM, as a scheduler preempting a job does.
- ``read_only``: after the 5th training step, the file system under $FSAM_RUNS refuses every change (EROFS), as
  when it is remounted read-only (the tests run as root, for whom chmod does not stop writes); see
  :class:`ReadOnlyFileSystem`.
- ``read_only_mount``: after the 5th training step, $FSAM_RUNS really becomes a read-only bind mount (the process
  must run in a mount namespace of its own, ``unshare --mount``, with the right to mount).
- ``folder_replaced``: after the 2nd training step, the run folder is renamed to ``<folder>.old`` and another launch
  creates a new folder at its path and takes the new folder's lock (it keeps holding it).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

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


class ReadOnlyFileSystem:
    """The file system under ``root`` turned read-only, as Linux refuses changes on a read-only mount: every call
    that would change something there fails with EROFS, deleting a file that is not there included, while reading
    works and creating a folder that exists still says EEXIST. (Checked against a real read-only bind mount by
    the ``read_only_mount`` fault.)

    It turns read-only at the first change, once ``after_steps`` training steps have run, to a file whose name
    contains ``name`` (any file when None), so a test can make exactly one of the engine's writes the first to
    fail. ``install(setattr)`` puts it in place: the built-in ``setattr``, or pytest's ``monkeypatch.setattr``.
    """

    WRITING_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, root: str | os.PathLike[str], *, name: str | None = None, after_steps: int = 0) -> None:
        self.root = os.path.realpath(root)
        self.name, self.after_steps = name, after_steps
        self.steps = 0
        self.read_only = False

    def _refuses(self, *arguments: Any) -> bool:
        paths = [os.fspath(path) for path in arguments if isinstance(path, (str, os.PathLike))]
        inside = [path for path in paths if os.path.realpath(path).startswith(self.root + os.sep)]
        if inside and not self.read_only and self.steps >= self.after_steps:
            self.read_only = self.name is None or any(self.name in os.path.basename(path) for path in inside)
        return bool(inside) and self.read_only

    def _refuse(self, path: str | os.PathLike[str]) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def install(self, setattr: Callable[[Any, str, Any], None] = setattr) -> None:
        import fsam.engine.loop as loop

        real_open, real_os_open, real_mkdir, real_step = builtins.open, os.open, os.mkdir, loop.train_step

        def guarded_open(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(flag in mode for flag in "wax+") and self._refuses(file):
                raise self._refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if flags & self.WRITING_FLAGS and self._refuses(path):
                raise self._refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            if self._refuses(path) and not os.path.exists(path):
                raise self._refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def refusing(real: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(*arguments, **kwargs):
                if self._refuses(*arguments):
                    raise self._refuse(arguments[0])
                return real(*arguments, **kwargs)

            return guarded

        def counting_step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            self.steps += 1
            return out

        setattr(builtins, "open", guarded_open)
        setattr(io, "open", guarded_open)  # pathlib opens files through io.open
        setattr(os, "open", guarded_os_open)
        setattr(os, "mkdir", guarded_mkdir)
        for name in ("unlink", "remove", "rmdir", "replace", "rename", "link", "symlink", "truncate"):
            setattr(os, name, refusing(getattr(os, name)))
        setattr(loop, "train_step", counting_step)


def _read_only_mount_after(steps: int) -> None:
    import fsam.engine.loop as loop

    runs = os.environ["FSAM_RUNS"]
    real_step, count = loop.train_step, [0]

    def counting_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        count[0] += 1
        if count[0] == steps:
            for command in (["mount", "--bind", runs, runs], ["mount", "-o", "remount,bind,ro", runs]):
                subprocess.run(command, check=True)
        return out

    loop.train_step = counting_step


def _folder_replaced_after(steps: int) -> None:
    import fsam.engine.loop as loop
    from fsam.runfolder import RunLock

    real_step, count, new_holders = loop.train_step, [0], []

    def counting_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        count[0] += 1
        if count[0] == steps:
            (lock,) = Path(os.environ["FSAM_RUNS"]).rglob(".lock")
            folder = lock.parent
            folder.rename(folder.with_name(folder.name + ".old"))
            folder.mkdir()
            new_holders.append(RunLock(folder))
            new_holders[-1].acquire()
        return out

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
        ReadOnlyFileSystem(os.environ["FSAM_RUNS"], after_steps=5).install()
    elif fault == "stop_at":
        _terminate_at(3)
    elif fault == "read_only_mount":
        _read_only_mount_after(5)
    elif fault == "folder_replaced":
        _folder_replaced_after(2)
    elif fault == "no_wandb":
        sys.modules["wandb"] = None  # import wandb raises ImportError
    else:
        raise SystemExit(f"unknown fault {fault}")
    sys.argv = [str(REPO / "train.py"), *arguments]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")  # exits with train.py's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
