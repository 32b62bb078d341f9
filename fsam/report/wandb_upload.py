"""Send finished records to Weights & Biases without training again: tables (as wandb Tables, their numbers as
numbers) and charts of the means with their spread in a report run, and whole run folders (backfill) as the runs
they were.

    log_tables({"settings": frame}, charts={"final_top1": MeanChart(...)}, project="fsam")   # one report run
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
class MeanChart:
    """The mean of one metric per setting with its spread: ``data`` has one row per setting (columns ``label``,
    ``method``, ``setting``, ``mean``, ``std``, ``n``); ``value_label`` names the metric, ``title`` the chart."""

    data: pd.DataFrame
    title: str
    value_label: str


def _init(mode: str, **kwargs: Any) -> Any:
    import wandb

    resolved, reason = resolve_mode(mode)
    if reason:
        print(f"warning: wandb {reason}: logging offline to {kwargs['dir']}/wandb; upload later with "
              f"`wandb sync {kwargs['dir']}/wandb/offline-run-*`", file=sys.stderr)
    return wandb.init(mode=resolved, settings=wandb.Settings(console="off", silent=True), **kwargs)


def log_tables(
    tables: dict[str, pd.DataFrame], charts: dict[str, MeanChart], *, project: str, entity: str | None = None,
    mode: str = "auto", folder: str | Path = ".", name: str = "tables",
) -> str:
    """One wandb run of job type ``report`` holding each table as ``tables/<name>`` and each chart as
    ``charts/<name>`` (a picture) beside ``charts/<name>_table`` (its numbers); returns the run's folder on disk."""
    import matplotlib.pyplot as plt
    import wandb

    from fsam.report.figures import mean_chart

    Path(folder).mkdir(parents=True, exist_ok=True)
    run = _init(mode, project=project, entity=entity, job_type="report", name=name, dir=str(folder))
    logged: dict[str, Any] = {}
    for key, frame in tables.items():
        logged[f"tables/{key}"] = wandb.Table(dataframe=_plain(frame))
    # A chart is a picture with error bars, because wandb's bar chart has none and a custom Vega chart needs a
    # spec stored on the wandb server, which an offline run cannot carry; beside it, the Table of its numbers,
    # which wandb's own panels sort and plot.
    for key, chart in charts.items():
        points = chart.data.dropna(subset=["mean"])
        figure = mean_chart(points, chart.title, chart.value_label)
        logged[f"charts/{key}"] = wandb.Image(figure)
        plt.close(figure)
        logged[f"charts/{key}_table"] = wandb.Table(dataframe=_plain(points))
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
    Returns the run folders logged; unfinished and damaged ones (:meth:`fsam.runfolder.RunFolder.problem`) are
    skipped with a note."""
    logged = []
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        summary = folder.finished_summary()
        config, identity = folder.read_config()
        if summary is None or config is None or identity is None:
            print(f"skipped: {folder.path} is not a finished run folder", file=sys.stderr)
            continue
        problem = folder.problem()
        if problem is not None:
            print(f"skipped: {folder.path} is damaged: {problem}", file=sys.stderr)
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
