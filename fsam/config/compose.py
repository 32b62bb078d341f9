"""Compose lists of overrides exactly as ``train.py`` does, without running anything (Hydra at the edge).

Scripts that list, check or choose runs before launching them (``scripts/reproduce.py``, ``scripts/compare.py``,
:mod:`fsam.study`) ask here for each cell's config and run folder, so what they report is what ``train.py``
would train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the project's configs, beside the package


def compose_cells(cells: list[list[str]], config_dir: Path = CONFIGS) -> list[dict[str, Any]]:
    """Each cell's config as train.py composes it (plain data, interpolations resolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fsam.config.run_folder import register_resolver

    register_resolver()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return [OmegaConf.to_container(compose("train", overrides=cell), resolve=True) for cell in cells]


def compose_runs(cells: list[list[str]], config_dir: Path = CONFIGS) -> list[tuple[Path, dict[str, Any]]]:
    """Each cell's run folder and config, its values checked (ConfigError for a bad one). Hydra's own overrides
    (hydra.*) do not change a run's folder and are left out of the composition."""
    from fsam.runfolder import default_run_dir

    configs = compose_cells([[item for item in cell if not item.startswith("hydra")] for cell in cells], config_dir)
    return [(default_run_dir(config), config) for config in configs]
