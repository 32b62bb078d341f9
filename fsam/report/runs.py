"""Read run folders: the one record format that tables and plots use, whatever launched the runs.

Each folder is read through :class:`fsam.runfolder.RunFolder`: ``config.yaml`` (the identity and the checked
config), ``metrics.jsonl`` (one JSON object per epoch) and, once finished, ``summary.json``. Runs are grouped by
their ``setting`` (what they compute, see :mod:`fsam.runfolder`), never by a fixed list of keys. Folders without
``summary.json`` are reported as unfinished (or diverged when ``status.json`` says so), never mixed into the
finished results. A folder whose records do not verify (:meth:`fsam.runfolder.RunFolder.problem`: a record that
does not parse, a config edited after the run) is damaged: listed with its problem, never tabulated. A finished
run measured by ``scripts/sharpness.py`` also brings its sharpness numbers (:mod:`fsam.report.sharpness`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fsam.errors import FsamError
from fsam.report.sharpness import read_measurements, sharpness_columns
from fsam.runfolder import RunFolder, lookup, model_kwargs, model_label, read_metrics, unused_keys

# Columns shown beside each setting; they describe it, the setting's digest decides what is grouped.
CONFIG_COLUMNS = {
    "dataset": "dataset.name",
    "noise": "dataset.noise.kind",
    "noise_ratio": "dataset.noise.ratio",
    "optimizer": "optimizer.name",
    "base": "optimizer.base",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "rho": "optimizer.rho",
    "sigma": "optimizer.sigma",
    "lmbda": "optimizer.lmbda",
    "epochs": "trainer.epochs",
    "batch_size": "trainer.batch_size",
    "seed": "trainer.seed",
}
# SAM with an analysis direction (optimizer.perturbation) is its own method in tables, under the names
# results/known-results.csv gives the paper's Figure-1 values.
PERTURBATION_METHODS = {"full": "sam-full-gradient-only", "noise": "sam-noise-only"}
# The files a run folder is found by; a folder with any of them is a run (one without config.yaml is damaged).
RECORDS = ("config.yaml", "summary.json", "metrics.jsonl")


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    from fsam.config import load_config, to_plain

    return to_plain(load_config(config))


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The per-epoch records of one run; lines that are not complete JSON (a run killed mid-write) are skipped."""
    return pd.DataFrame(read_metrics(Path(run_dir) / "metrics.jsonl"))


def run_folders(root: str | Path) -> list[Path]:
    """The folders under ``root`` (``root`` itself included) that hold a run record: config.yaml, summary.json or
    metrics.jsonl. wandb's own folders are not runs (an online run keeps a config.yaml of its own there)."""
    root = Path(root)
    return sorted({path.parent for name in RECORDS for path in root.rglob(name)
                   if "wandb" not in path.relative_to(root).parts})


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder found under ``root``: its setting, config columns, status and the summary's figures.

    ``model`` is the network as built (``pyramidnet8`` for a PyramidNet of depth 8), ``model_parameters`` its
    parameter count where the run recorded it. A hyperparameter the run's method never reads (SGD's ``rho``) is
    empty. ``status`` is finished, diverged, running (a process holds the folder now), unfinished or damaged: its
    records do not verify, ``problem`` says why, and it has no setting (nothing of it is tabulated).
    """
    rows = []
    for path in run_folders(root):
        folder = RunFolder(path)
        problem = folder.problem()
        config, identity = folder.read_config()
        config = config or {}
        model = config.get("model") or {}
        row: dict[str, Any] = {
            "run_dir": str(folder.path),
            "setting": identity["setting"] if identity and problem is None else None,
            "model": model_label(model.get("name", "?"), model_kwargs(model.get("name", "?"), model.get("kwargs") or {}))
            if identity else model.get("name"),
            "model_parameters": ((identity or {}).get("model") or {}).get("parameters"),
        }
        unused = set(unused_keys(_with_defaults(config))) if identity else set()
        row.update({
            column: None if key in unused else lookup(config, key) for column, key in CONFIG_COLUMNS.items()
        })
        # What the release's numbers also depend on, beyond the hyperparameters (known-results.csv matches them).
        row["init"] = model_kwargs(model.get("name", "?"), model.get("kwargs") or {}).get("init") if identity else None
        row["last_batch"] = "dropped" if lookup(config, "dataset.drop_last") in (None, True) else "kept"
        perturbation = lookup(config, "optimizer.perturbation")
        if row["optimizer"] == "sam" and perturbation in PERTURBATION_METHODS:
            row["optimizer"] = PERTURBATION_METHODS[perturbation]
        row["status"], row["problem"] = ("damaged", problem) if problem else (folder.state(), None)
        summary = folder.finished_summary() if problem is None else None
        if summary is not None:
            row.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k not in row})
            row.update(sharpness_columns(read_measurements(folder.path)))
        rows.append(row)
    return pd.DataFrame(rows)


def damaged(runs: pd.DataFrame) -> list[str]:
    """``damaged: <folder>: <problem>``, one line per run folder whose records do not verify."""
    if "status" not in runs:
        return []
    return [f"damaged: {row.run_dir}: {row.problem}" for row in runs[runs["status"] == "damaged"].itertuples()]


def runs_under(root: str | Path | None) -> pd.DataFrame:
    """:func:`load_runs` of ``root``, or FsamError saying what is missing and what to do (for the scripts)."""
    if root is None or not Path(root).is_dir():
        raise FsamError(f"no run folder at {root}: pass the folder your runs were written to (FSAM_RUNS, default runs/)")
    runs = load_runs(root)
    if runs.empty:
        raise FsamError(f"no run folders (with config.yaml) under {root}: train something first, e.g. "
                        "python train.py experiment=quickstart")
    return runs
