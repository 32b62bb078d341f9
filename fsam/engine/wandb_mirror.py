"""A live view of the run in Weights & Biases; the run folder stays the record.

The mirror gets the checked config (with the run's identity), the training loss and learning rate every
``trainer.log_every`` steps or more often in a short run, and at each epoch's last step (``train/loss``,
``train/lr``; ``fsam.engine.loop.STEP_POINTS``), each epoch's metrics row under ``train/``, ``test/`` and
``time/`` (:data:`EPOCH_KEYS`), the whole summary (nested values kept) and the console output. Logging never stops training: if wandb is missing or any call fails, one warning is printed and the
mirror turns itself off. ``mode: online`` and ``auto`` go online only with an API key (``WANDB_API_KEY`` or a netrc entry)
and a reachable server; otherwise (one warning) the run is written offline under ``<run_dir>/wandb/`` and can be
uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``. A ``WANDB_MODE`` in the environment decides
``auto`` too. A finished offline run prints where it is and the exact ``wandb sync`` command for its folders (one per
launch).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

from fsam.config import LoggerConfig
from fsam.wandbio import epoch_record, offline_note, resolve_mode

__all__ = ["WandbMirror", "epoch_record", "new_run_id", "resolve_mode"]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class WandbMirror:
    """Mirror of one run; ``run_id`` (kept in the checkpoints) makes a resumed run continue the same wandb run.

    ``group`` and ``name`` are used unless the logger config sets its own: the engine passes the run's setting
    name (seeds of one setting form one wandb group) and the setting name with the seed.
    """

    def __init__(
        self, config: LoggerConfig, run_dir: str, run_id: str, *, group: str | None = None, name: str | None = None
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.run_id = run_id
        self.group = config.group or group
        self.name = config.name or name
        self.run: Any = None
        self.offline = False

    def start(self, plain_config: dict[str, Any], *, resumed: bool) -> None:
        if self.config.backend != "wandb":
            return
        try:
            import wandb
        except ImportError:
            print(
                f"warning: wandb is not installed (pip install wandb); training continues without it, the run "
                f"folder {self.run_dir} has every record",
                file=sys.stderr,
            )
            return
        try:
            mode, reason = resolve_mode(self.config.mode)
            self.offline = mode == "offline"
            if reason:
                print(
                    f"warning: wandb {reason}: logging offline to {self.run_dir}/wandb; upload later with "
                    f"`wandb sync {self.run_dir}/wandb/offline-run-*`",
                    file=sys.stderr,
                )
            self.run = wandb.init(
                project=self.config.project,
                entity=self.config.entity,
                group=self.group,
                tags=list(self.config.tags) or None,
                name=self.name,
                mode=mode,
                dir=self.run_dir,
                config=plain_config,
                id=self.run_id,
                resume="allow" if resumed else None,
                job_type="train",
                settings=wandb.Settings(console="wrap", silent=True),
            )
        except Exception as error:  # noqa: BLE001 - logging must never stop a run
            self._give_up("start", error)

    def log(self, row: dict[str, Any], step: int) -> None:
        """Log ``row`` (wandb keys) at global step ``step``."""
        if self.run is None:
            return
        try:
            self.run.log(row, step=step)
        except Exception as error:  # noqa: BLE001
            self._give_up("log", error)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row, at its step."""
        self.log(epoch_record(row), step=row["step"])

    def finish(self, summary: dict[str, Any] | None = None, *, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update({key: value for key, value in summary.items() if value is not None})
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as error:  # noqa: BLE001
            self._give_up("finish", error)
        else:
            # a resumed run continues the same wandb run from a new folder: every launch's folder is uploaded
            launches = sorted(Path(self.run_dir, "wandb").glob(f"offline-run-*-{self.run_id}"))
            if self.offline and not failed and launches:
                print(offline_note("the run", launches), flush=True)
        self.run = None

    def _give_up(self, action: str, error: Exception) -> None:
        first_line = str(error).splitlines()[0] if str(error) else ""
        print(
            f"warning: wandb {action} failed ({type(error).__name__}: {first_line}); training continues without "
            f"wandb, the run folder {self.run_dir} has every record",
            file=sys.stderr,
        )
        if self.run is not None and action != "finish":
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        self.run = None
