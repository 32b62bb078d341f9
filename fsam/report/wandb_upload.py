"""Send finished records to Weights & Biases without training again: tables (as wandb Tables with a bar chart
each) in a report run, and whole run folders (backfill) as the runs they were.

    log_tables({"paper_best_top1": frame}, charts={...}, project="fsam")     # one report run
    backfill(["runs/cifar100-resnet18-fsam-49c7758d8fc4/seed1"], project="fsam")

Both go offline when wandb cannot go online (no login, no network; see :func:`fsam.wandbio.resolve_mode`) and are
uploaded later with ``wandb sync <folder>/wandb/offline-run-*``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from fsam.runfolder import RunFolder
from fsam.wandbio import epoch_record, resolve_mode


@dataclass(frozen=True)
class BarChart:
    """A bar chart of ``value`` per ``label`` over the rows of ``data``, titled ``title``."""

    data: pd.DataFrame
    label: str
    value: str
    title: str


def _init(mode: str, **kwargs: Any) -> Any:
    import wandb

    resolved, reason = resolve_mode(mode)
    if reason:
        print(f"warning: wandb {reason}: logging offline to {kwargs['dir']}/wandb; upload later with "
              f"`wandb sync {kwargs['dir']}/wandb/offline-run-*`", file=sys.stderr)
    return wandb.init(mode=resolved, settings=wandb.Settings(console="off", silent=True), **kwargs)


def log_tables(
    tables: dict[str, pd.DataFrame], charts: dict[str, BarChart], *, project: str, entity: str | None = None,
    mode: str = "auto", folder: str | Path = ".", name: str = "tables",
) -> str:
    """One wandb run of job type ``report`` holding each table as ``tables/<name>`` and each chart as
    ``charts/<name>``; returns the run's folder on disk."""
    import wandb

    Path(folder).mkdir(parents=True, exist_ok=True)
    run = _init(mode, project=project, entity=entity, job_type="report", name=name, dir=str(folder))
    logged: dict[str, Any] = {}
    for key, frame in tables.items():
        logged[f"tables/{key}"] = wandb.Table(dataframe=_plain(frame))
    for key, chart in charts.items():
        table = wandb.Table(dataframe=_plain(chart.data[[chart.label, chart.value]].dropna()))
        logged[f"charts/{key}"] = wandb.plot.bar(table, chart.label, chart.value, title=chart.title)
    run.log(logged)
    where = run.dir
    run.finish()
    return str(Path(where).parent)


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame wandb can store: the index as columns, every cell a string or a number."""
    flat = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame.copy()
    flat.columns = [str(column) for column in flat.columns]
    for column in flat.columns:
        if flat[column].dtype == object:
            flat[column] = flat[column].map(lambda value: "" if value is None else str(value))
    return flat


def backfill(run_dirs: Iterable[str | Path], *, project: str, entity: str | None = None, mode: str = "auto") -> list[str]:
    """Log each finished run folder to wandb from its records: config and identity, every epoch's metrics at its
    step, the summary; named and grouped like a live run (``<setting>-seed<N>`` in group ``<setting>``) and under
    the wandb id the run had (``summary.json``), so a run logged live is continued rather than duplicated.
    Returns the run folders logged; unfinished ones are skipped with a note."""
    logged = []
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        summary = folder.finished_summary()
        config, identity = folder.read_config()
        if summary is None or config is None or identity is None:
            print(f"skipped: {folder.path} is not a finished run folder", file=sys.stderr)
            continue
        run = _init(
            mode, project=project, entity=entity, job_type="train", dir=str(folder.path),
            name=f"{identity['setting']}-seed{identity['seed']}", group=identity["setting"],
            id=summary.get("wandb_id"), resume="allow", config={**config, "identity": identity},
        )
        for row in folder.read_metrics():
            run.log(epoch_record(row), step=row["step"])
        run.summary.update({key: value for key, value in summary.items() if value is not None})
        run.finish()
        logged.append(str(folder.path))
    return logged
