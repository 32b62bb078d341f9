"""Read run folders: the one record format that tables and plots use, whatever launched the runs.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per epoch) and,
once finished, ``summary.json``. Folders without ``summary.json`` are reported as unfinished (or diverged when
``status.json`` says so), never mixed into the finished results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

CONFIG_COLUMNS = {
    "dataset": ("dataset", "name"),
    "noise": ("dataset", "noise", "kind"),
    "noise_ratio": ("dataset", "noise", "ratio"),
    "model": ("model", "name"),
    "optimizer": ("optimizer", "name"),
    "base": ("optimizer", "base"),
    "lr": ("optimizer", "lr"),
    "rho": ("optimizer", "rho"),
    "sigma": ("optimizer", "sigma"),
    "lmbda": ("optimizer", "lmbda"),
    "epochs": ("trainer", "epochs"),
    "batch_size": ("trainer", "batch_size"),
    "seed": ("trainer", "seed"),
}


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The per-epoch records of one run; lines that are not complete JSON (a run killed mid-write) are skipped."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return pd.DataFrame(rows)


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder found under ``root``: config columns, status and the summary's figures."""
    rows = []
    for config_path in sorted(Path(root).rglob("config.yaml")):
        run_dir = config_path.parent
        if run_dir.name == ".hydra":
            continue
        config = yaml.safe_load(config_path.read_text()) or {}
        row: dict[str, Any] = {"run_dir": str(run_dir)}
        row.update({column: _lookup(config, path) for column, path in CONFIG_COLUMNS.items()})
        summary = _read_json(run_dir / "summary.json")
        status = _read_json(run_dir / "status.json") or {}
        if summary is not None:
            row["status"] = summary.get("status", "finished")
            row.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k not in row})
        else:
            row["status"] = status.get("status", "unfinished")
        rows.append(row)
    return pd.DataFrame(rows)
