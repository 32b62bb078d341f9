"""How a run appears in Weights & Biases, for the live mirror (fsam.engine.wandb_mirror) and for uploads of
finished run folders (fsam.report.wandb_upload): which mode wandb can run in, and the names of the metrics.

No torch here, and wandb itself is imported only by the callers that log.
"""

from __future__ import annotations

import netrc
import os
import shlex
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_SERVER = "https://api.wandb.ai"
# metrics.jsonl keys -> wandb keys; steps are global training steps, so per-step and per-epoch points share an axis.
EPOCH_KEYS = {
    "epoch": "epoch",
    "train_loss": "train/epoch_loss",
    "train_top1": "train/top1",
    "test_loss": "test/loss",
    "test_top1": "test/top1",
    "test_top5": "test/top5",
    "val_loss": "val/loss",
    "val_top1": "val/top1",
    "val_top5": "val/top5",
    "lr": "train/lr_after_epoch",  # metrics.jsonl keeps the rate the next step will use; train/lr is per step
    "images_per_s": "time/images_per_s",
    "skipped_steps": "train/skipped_steps",
    "epoch_time_s": "time/epoch_s",
    "wall_time_s": "time/wall_s",
}


def epoch_record(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row as wandb keys (unknown keys keep their name). The epoch's ``analysis`` measurements are
    left out: they went to wandb at their own steps (``analysis/...``)."""
    return {EPOCH_KEYS.get(key, key): value for key, value in row.items() if key not in ("step", "analysis")}


def offline_note(what: str, run_folders: list[str | Path]) -> str:
    """Where ``what`` was logged offline (wandb's ``offline-run-<time>-<id>`` folders) and the exact command that
    uploads it."""
    folders = [str(folder) for folder in run_folders]
    command = shlex.join(["wandb", "sync", *folders])
    return f"wandb: {what} logged offline to {', '.join(folders)}; upload with: {command}"


def is_offline_run(folder: str | Path) -> bool:
    """Whether a wandb run folder is an offline run's: wandb names them ``offline-run-<time>-<id>``."""
    return Path(folder).name.startswith("offline-run-")


def resolve_mode(mode: str) -> tuple[str, str | None]:
    """The mode wandb can run in now, and why it differs from the one asked for (None when it does not).

    ``offline`` stays offline. ``auto`` follows a ``WANDB_MODE`` in the environment. ``online`` (and ``auto``
    without ``WANDB_MODE``) needs an API key and a reachable server; without either the run goes offline, with
    the reason, so a missing login or a cluster node without internet never stops training.
    """
    if mode == "offline":
        return "offline", None
    from_environment = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode == "auto" and from_environment in ("online", "offline", "disabled"):
        return from_environment, None
    url = os.environ.get("WANDB_BASE_URL", DEFAULT_SERVER)
    parsed = urlparse(url)
    host = parsed.hostname or "api.wandb.ai"
    if not _has_api_key(host):
        return "offline", "not logged in (no WANDB_API_KEY and no `wandb login`)"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    if not _reachable(host, port):
        return "offline", f"{url} is unreachable"
    return "online", None


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
