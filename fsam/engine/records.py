"""The run folder: the single source of truth every reader (tables, plots, wandb sync) works from.

    <run_dir>/config.yaml       the checked config of this run (rewritten at every launch)
    <run_dir>/metrics.jsonl     one JSON object per finished epoch
    <run_dir>/checkpoints/      last.pt, last.prev.pt, best.pt (see fsam.engine.checkpoint)
    <run_dir>/status.json       only when the run stopped for a reason a relaunch cannot fix (diverged)
    <run_dir>/summary.json      written last, atomically: its presence means the run finished

Every whole-file write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target, so a reader (or a killed run) sees either the old content or the new one, never half of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

PACKAGES = ("torch", "torchvision", "timm", "numpy", "hydra-core", "omegaconf", "wandb", "fsam")


def write_atomic(path: str | os.PathLike[str], text: str | bytes) -> None:
    """Replace ``path`` with ``text`` in one step: temporary file, flush, fsync, rename."""
    path = Path(path)
    data = text.encode() if isinstance(text, str) else text
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_json_atomic(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    # Serialised before anything touches the disk, so a record that cannot be written leaves no trace.
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True, allow_nan=True) + "\n")


def sync_folder(folder: Path) -> None:
    """Make a rename durable (the folder entry); not possible on every platform, harmless to skip there."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunFolder:
    """Paths and writers of one run folder."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.status = self.path / "status.json"
        self.checkpoints = self.path / "checkpoints"

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a finished run, or None while the run is unfinished."""
        return read_json(self.summary) if self.summary.exists() else None

    def stopped_status(self) -> dict[str, Any] | None:
        """The status record of a run that stopped for good (diverged), else None."""
        status = read_json(self.status)
        return status if status and status.get("status") == "diverged" else None

    def write_config(self, config: dict[str, Any]) -> None:
        write_atomic(self.config, yaml.safe_dump(config, sort_keys=False))

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl hold exactly ``rows`` (on resume: the epochs the checkpoint has seen)."""
        write_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One line, one write, flushed to disk: a reader sees a complete line or none."""
        with open(self.metrics, "a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def write_status(self, status: dict[str, Any]) -> None:
        write_json_atomic(self.status, status)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary, summary)


def git_commit() -> str | None:
    """The commit of the checkout the fsam package was imported from (``+dirty`` with local changes)."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if changes else "") if commit else None


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
