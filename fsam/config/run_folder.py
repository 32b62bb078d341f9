"""The OmegaConf resolver ``fsam_run_folder``: Hydra's run and sweep folders from what a run computes.

``configs/train.yaml`` sets ``hydra.run.dir: ${fsam_run_folder:}`` and ``hydra.sweep.subdir:
${fsam_run_folder:absolute}``. The resolver reads the whole composed config (not the command line), checks it and
returns ``run_dir`` when the config sets one, else :func:`fsam.runfolder.default_run_dir`: the same settings
reach the same folder however they were typed (a single run, a sweep's job, an experiment file, an edited
default). A bad value raises :class:`fsam.errors.ConfigError` here, before Hydra creates anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESOLVER = "fsam_run_folder"
NOT_KNOWN_HERE = "(the run folder follows from the job's config: add --dry-run to the command to see it)"


def run_folder(how: str = "", *, _root_: Any) -> str:
    """The run folder of the config ``_root_`` (Hydra's, ``hydra`` node included); ``how="absolute"`` resolves it
    against the current folder (a sweep joins it to its own folder, which an absolute path overrides)."""
    from omegaconf import OmegaConf

    from fsam.config import load_config
    from fsam.errors import ConfigError
    from fsam.runfolder import default_run_dir

    keys = [key for key in _root_ if key != "hydra"]
    if not keys:  # `--cfg hydra` prints Hydra's settings without the job's: its folder cannot be known there
        return NOT_KNOWN_HERE
    config = OmegaConf.to_container(OmegaConf.masked_copy(_root_, keys), resolve=True)
    if config.get("run_dir") is None:
        folder = default_run_dir(config)
    else:
        folder = Path(load_config(config).run_dir)  # checks every value, and that run_dir is not empty
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"run_dir={folder} is a file, not a folder: give a folder, or leave run_dir out")
    return str(folder.resolve() if how == "absolute" else folder)


def register_resolver() -> None:
    """Make ``${fsam_run_folder:}`` available to OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, run_folder, replace=True)


register_resolver()
