"""The run folder's name from the command line: the same command names the same folder.

``run_folder_name`` is a pure function of the overrides (``key=value`` strings, as Hydra records them in
``hydra.overrides.task``) and the seed. Importing this module also registers it as the OmegaConf resolver
``fsam_run_folder``, which ``configs/train.yaml`` uses for ``hydra.run.dir`` and ``hydra.sweep.subdir``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

RESOLVER = "fsam_run_folder"
MAX_NAME_BYTES = 200  # file systems allow 255 per folder name; the rest is room for the hash suffix


def override_key(override: str) -> str:
    """``+model.kwargs.depth=8`` -> ``model.kwargs.depth`` (no add/delete prefix, no ``@package``)."""
    key = override.split("=", 1)[0].lstrip("~+")
    return key.split("@", 1)[0]


def run_folder_name(overrides: Iterable[str], exclude_keys: Iterable[str], seed: int) -> str:
    """``<sorted overrides joined by ','>/seed<seed>``, or ``seed<seed>`` without overrides.

    Keys in ``exclude_keys`` (where data lives, logging, the seed itself...) are left out. ``/`` in a value
    becomes ``%2F`` so a path stays one folder level. A name longer than 200 bytes keeps its first 180 bytes and
    gets the first 12 hex digits of the whole name's SHA-1, so it stays unique and readable.
    """
    excluded = set(exclude_keys)
    kept = sorted(str(o) for o in overrides if override_key(str(o)) not in excluded)
    name = ",".join(kept).replace("/", "%2F")
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = name.encode()[:180].decode(errors="ignore") + "..." + digest
    return f"{name}/seed{seed}" if name else f"seed{seed}"


def register_resolver() -> None:
    """Make ``${fsam_run_folder:overrides,exclude_keys,seed}`` available to OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, run_folder_name, replace=True)


register_resolver()
