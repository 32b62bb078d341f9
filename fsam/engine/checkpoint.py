"""Checkpoints that survive being killed at any moment, and the random state that makes resuming exact.

``checkpoints/last.pt`` is the newest state, ``last.prev.pt`` the one before (the fallback when ``last.pt`` is
unreadable), ``best.pt`` the state at the epoch with the best test top-1. A save writes a temporary file, syncs
it, (at a best epoch) makes it ``best.pt``, moves ``last.pt`` to ``last.prev.pt`` and renames the temporary file to
``last.pt``: at every instant at least one complete checkpoint exists, and a save that fails part way (a full
disk, a file system turned read-only) leaves the checkpoints a relaunch continues from. ``best.pt`` is a hard
link to the ``last.pt`` it was saved with (no second copy on disk), or a copy where the file system has no hard
links.

``final.pt`` is written once, when the last epoch has ended and before ``summary.json``: the model's
``state_dict()`` alone (float32 weights and BatchNorm buffers, no optimizer state), so every finished run keeps its
final weights at the size of the network (``torch.load(path, weights_only=True)`` then
``model.load_state_dict(...)``). Its size, measured with ``torch.save`` (torch 2.14, 2026-12-06) at 100
classes: ResNet-18 45.0 MB (11,220,132 parameters), WRN-28-10 146.3 MB, PyramidNet-110 74.4 MB, VGG16-BN 59.1 MB,
the quick start's depth-8 PyramidNet 0.17 MB: 4 bytes per parameter and BatchNorm buffer, plus the names (under
0.1 % of these networks, 13 % of the tiny one). ``last.pt`` holds the same weights beside the optimizer state.

Checkpoints hold tensors, numbers, strings and containers only, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsam.runfolder import kept_checkpoints, private_temporary, remove_temporary, sync_folder, write_error
from fsam.errors import CheckpointError


class CheckpointStore:
    """The checkpoints of one run folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.last = self.folder / "last.pt"
        self.previous = self.folder / "last.prev.pt"
        self.best = self.folder / "best.pt"
        self.final = self.folder / "final.pt"

    def save(self, state: dict[str, Any], *, best: bool = False) -> None:
        """Write ``state`` as the new ``last.pt`` (keeping the old one as ``last.prev.pt``); also as ``best.pt``.

        A write that fails (disk full, read-only folder) leaves the checkpoints as they were, or with ``last.pt``
        already moved to ``last.prev.pt`` where the failure came between the two renames, and raises
        RunFolderError naming the file, the checkpoints kept and the fix."""
        temporary = self._written_aside(state, self.last)
        if best:
            self._mark_best(temporary)
        try:
            if self.last.exists():
                os.replace(self.last, self.previous)
            os.replace(temporary, self.last)
        except OSError as error:
            remove_temporary(temporary)
            raise write_error(self.last, error, kept_checkpoints(self.folder)) from None
        sync_folder(self.folder)

    def save_final(self, model_state: dict[str, torch.Tensor]) -> None:
        """Write ``model_state`` (the model's ``state_dict()``) as ``final.pt``, whole or not at all; a failed write
        raises RunFolderError and leaves every other checkpoint as it was."""
        temporary = self._written_aside(model_state, self.final)
        try:
            os.replace(temporary, self.final)
        except OSError as error:
            remove_temporary(temporary)
            raise write_error(self.final, error, kept_checkpoints(self.folder)) from None
        sync_folder(self.folder)

    def _written_aside(self, state: dict[str, Any], target: Path) -> Path:
        """``state`` saved and synced to a private temporary file beside ``target``; its path."""
        self.folder.mkdir(exist_ok=True)  # not its parents: a run folder deleted mid-run is not recreated
        temporary = private_temporary(target)
        try:
            with open(temporary, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        except (OSError, RuntimeError) as error:
            remove_temporary(temporary)
            cause = error if isinstance(error, OSError) else _os_error_in(error)
            if cause is None:
                raise
            raise write_error(target, cause, kept_checkpoints(self.folder)) from None
        return temporary

    def _mark_best(self, checkpoint: Path) -> None:
        """Make ``best.pt`` the written ``checkpoint`` before it becomes ``last.pt``: a failure here changes no
        checkpoint, so ``best.pt`` never lags behind the best epoch that ``last.pt`` records."""
        temporary = private_temporary(self.best)
        try:
            try:
                os.link(checkpoint, temporary)
            except OSError:
                shutil.copyfile(checkpoint, temporary)
            os.replace(temporary, self.best)
        except OSError as error:
            remove_temporary(temporary)
            remove_temporary(checkpoint)
            raise write_error(self.best, error, kept_checkpoints(self.folder)) from None

    def load_latest(self, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
        """The newest readable checkpoint: ``last.pt``, else ``last.prev.pt`` with a warning; None if neither
        exists. Raises :class:`CheckpointError` when checkpoints exist but none can be read."""
        problems = []
        for path in (self.last, self.previous):
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as error:  # a torn or foreign file shows up as any of several exception types
                problems.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
                print(f"warning: checkpoint {path} is unreadable, trying the previous one", file=sys.stderr)
                continue
            if not isinstance(state, dict) or "model" not in state:
                problems.append(f"{path} (not a checkpoint of this engine)")
                continue
            return state
        if problems:
            raise CheckpointError(
                f"no readable checkpoint in {self.folder}: {'; '.join(problems)}; delete the folder to start over"
            )
        return None


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error torch's writer raised (it reports a failed write as a RuntimeError)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    if "write" in text and ("failed" in text or "error" in text):
        return OSError(errno.EIO, str(error).splitlines()[0] if str(error) else "write failed")
    return None


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain values."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    saved = state["numpy"]
    np.random.set_state(
        (saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
         saved["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples it gave; a round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value

