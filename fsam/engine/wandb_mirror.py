"""A live view of the run in Weights & Biases; the run folder stays the record.

The mirror gets the checked config, each epoch's metrics row (the same keys as ``metrics.jsonl``) and the
summary. Logging never stops training: if wandb is missing or any call fails, one warning is printed and the
mirror turns itself off. ``mode: online`` and ``auto`` go online only with an API key (``WANDB_API_KEY`` or a netrc entry)
and a reachable server; otherwise (one warning) the run is written offline under ``<run_dir>/wandb/`` and can be
uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``. A ``WANDB_MODE`` in the environment decides
``auto`` too.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
import uuid
from typing import Any
from urllib.parse import urlparse

from fsam.config import LoggerConfig

DEFAULT_SERVER = "https://api.wandb.ai"


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
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as error:  # noqa: BLE001 - logging must never stop a run
            self._give_up("start", error)

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(row, step=step)
        except Exception as error:  # noqa: BLE001
            self._give_up("log", error)

    def finish(self, summary: dict[str, Any] | None = None, *, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as error:  # noqa: BLE001
            self._give_up("finish", error)
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
