"""The report a study (:mod:`fsam.study`) fixed before its runs, read from the run folders: each method's choice,
its seeds' results, the paired differences with their interval, how the runs fit their training labels, F-SAM's
EMA against the full gradient, sharpness where measured, and the λ × σ heatmap.

    collected = collect(DIGITS_NOISE, compose_runs)          # reads the tuning, seed and heatmap runs
    tables = comparison_tables(collected)                      # pandas frames, numbers as numbers
    write_report(collected, Path("results/reproduction/digits_noise"))

Only runs whose records verify count (:meth:`fsam.runfolder.RunFolder.problem`); a missing or damaged seed is
named in ``collected.missing`` and left out, never averaged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fsam.report.sharpness import metric_title, sharpness_columns, sharpness_metrics
from fsam.report.tables import to_latex
from fsam.runfolder import RunFolder, read_metrics, write_atomic
from fsam.study import Choice, ComposeRuns, Study, choices, heatmap_cells, paired_difference

# The comparisons reported, (a, b): a − b per seed.
PAIRS = (("fsam", "sam"), ("fsam", "sgd"), ("sam", "sgd"))
SPREAD = "mean ± sample standard deviation over seeds (n − 1 denominator), n seeds"


@dataclass
class Run:
    """One finished run: its seed, summary, per-epoch rows and sharpness record (None where not measured)."""

    seed: int
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    sharpness: dict[str, Any] | None = None


@dataclass
class Collected:
    study: Study
    chosen: dict[tuple[str, str], Choice]
    seeds: dict[tuple[str, str], list[Run]]
    heatmap: dict[tuple[float, float], list[Run]]
    missing: list[str] = field(default_factory=list)


def _read(folder: Path, seed: int, missing: list[str]) -> Run | None:
    run = RunFolder(folder)
    problem = run.problem() if folder.exists() else "not trained"
    summary = run.finished_summary() if problem is None else None
    if summary is None:
        missing.append(f"{folder}: {problem or 'not finished'}")
        return None
    sharpness_file = folder / "analysis" / "sharpness.json"
    sharpness = json.loads(sharpness_file.read_text()) if sharpness_file.exists() else None
    return Run(seed, summary, read_metrics(run.metrics), sharpness)


def collect(study: Study, compose_runs: ComposeRuns) -> Collected:
    """Every seed-stage and heatmap run of ``study`` (FsamError if its tuning stage is not finished)."""
    chosen = choices(study, compose_runs)
    missing: list[str] = []
    seeds: dict[tuple[str, str], list[Run]] = {}
    keys = list(chosen)
    cells = [[*chosen[key].overrides, f"trainer.seed={seed}"] for key in keys for seed in range(1, study.seeds + 1)]
    folders = iter(compose_runs(cells))
    for key in keys:
        runs = [_read(next(folders)[0], seed, missing) for seed in range(1, study.seeds + 1)]
        seeds[key] = [run for run in runs if run is not None]
    heatmap: dict[tuple[float, float], list[Run]] = {}
    settings = heatmap_cells(study, compose_runs)
    cells = [[*setting, f"trainer.seed={seed}"] for setting in settings for seed in range(1, study.heatmap_seeds + 1)]
    folders = iter(compose_runs(cells))
    for setting in settings:
        values = {key: float(value) for key, value in (item.split("=", 1) for item in setting) if key in study.heatmap}
        point = (values["optimizer.lmbda"], values["optimizer.sigma"])
        runs = [_read(next(folders)[0], seed, missing) for seed in range(1, study.heatmap_seeds + 1)]
        heatmap[point] = [run for run in runs if run is not None]
    return Collected(study, chosen, seeds, heatmap, missing)


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    array = np.asarray([value for value in values if value is not None and not math.isnan(value)], dtype=float)
    if len(array) == 0:
        return math.nan, math.nan, 0
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan, len(array)


def _cell(mean: float, std: float, n: int, digits: str = ".2f") -> str:
    if n == 0:
        return "—"
    return f"{mean:{digits}}" + (f" ± {std:{digits}}" if n > 1 else "") + f" (n={n})"


def _ema_cosine(run: Run, last: bool) -> float | None:
    records = [record for row in run.metrics for record in row.get("analysis") or []]
    if not records:
        return None
    return float(records[-1]["ema_cosine"]) if last else float(np.mean([record["ema_cosine"] for record in records]))


SUMMARY_VALUES = {
    "final_top1": "final-epoch test top-1 (%)",
    "test_top1_at_best_val": "test top-1 at the best validation epoch (%)",
    "final_val_top1": "final-epoch validation top-1 (%)",
    "train_fit_top1": "top-1 on the training labels as trained, noisy included (%, eval mode)",
    "train_clean_top1": "top-1 on the training images' clean labels (%, eval mode)",
}


def _sharpness_values(run: Run) -> dict[str, float]:
    """The run's sharpness metrics (λ_max, the trace, ρ-sharpness by geometry, radius and case; see
    :mod:`fsam.report.sharpness`), without their options: a study measures all its runs with the same ones."""
    columns = sharpness_columns(dict((run.sharpness or {}).get("measurements") or {}))
    return {name: value for name, value in columns.items() if not name.endswith("_options")}


def comparison_tables(collected: Collected) -> dict[str, pd.DataFrame]:
    """``results`` (one row per condition, method and value: mean, std, n, and the formatted cell),
    ``differences`` (per condition and pair: mean, 95 % interval, n, verdict), ``chosen`` (each method's
    hyperparameters and the validation value that chose them), ``heatmap`` (λ, σ, mean, std, n of the final
    validation top-1)."""
    study = collected.study
    rows = []
    for (condition, method), runs in collected.seeds.items():
        values: dict[str, list[float]] = {key: [run.summary.get(key) for run in runs] for key in SUMMARY_VALUES}
        values["ema_cosine_mean"] = [_ema_cosine(run, last=False) for run in runs]
        values["ema_cosine_last"] = [_ema_cosine(run, last=True) for run in runs]
        for name in sorted({name for run in runs for name in _sharpness_values(run)}):
            values[f"sharpness.{name}"] = [_sharpness_values(run).get(name) for run in runs]
        for key, series in values.items():
            mean, std, n = _mean_std([value for value in series if value is not None])
            if n:
                digits = ".3g" if key.startswith("sharpness.") else ".2f"  # curvatures span orders of magnitude
                rows.append({"condition": condition, "method": method, "value": key, "mean": mean, "std": std,
                             "n": n, "cell": _cell(mean, std, n, digits)})
    results = pd.DataFrame(rows, columns=["condition", "method", "value", "mean", "std", "n", "cell"])
    differences = []
    for condition in study.conditions:
        for a, b in PAIRS:
            if (condition, a) not in collected.seeds or (condition, b) not in collected.seeds:
                continue
            first = {run.seed: run.summary["final_top1"] for run in collected.seeds[(condition, a)]}
            second = {run.seed: run.summary["final_top1"] for run in collected.seeds[(condition, b)]}
            difference = paired_difference(first, second)
            differences.append({"condition": condition, "pair": f"{a} - {b}", "mean": difference.mean,
                                "low": difference.low, "high": difference.high, "n": difference.n,
                                "verdict": difference.text(" points").rsplit(": ", 1)[-1]
                                if difference.n > 1 else "no interval", "cell": difference.text()})
    chosen = pd.DataFrame([
        {"condition": condition, "method": method, study.select: choice.value,
         **{item.split("=", 1)[0].removeprefix("optimizer."): float(item.split("=", 1)[1])
            for item in choice.overrides if item.startswith("optimizer.") and not item.startswith("optimizer=")}}
        for (condition, method), choice in collected.chosen.items()
    ])
    heatmap = pd.DataFrame([
        {"lmbda": lmbda, "sigma": sigma, **dict(zip(("mean", "std", "n"),
                                                   _mean_std([run.summary["final_val_top1"] for run in runs])))}
        for (lmbda, sigma), runs in collected.heatmap.items()
    ])
    return {"results": results, "differences": pd.DataFrame(differences), "chosen": chosen, "heatmap": heatmap}


def results_layout(results: pd.DataFrame, value: str, study: Study | None = None) -> pd.DataFrame:
    """One value as a table a reader scans: conditions as rows (in the study's order), methods as columns (in
    its search's order), formatted cells."""
    chosen = results[results["value"] == value]
    if chosen.empty:
        return pd.DataFrame()
    table = chosen.pivot(index="condition", columns="method", values="cell")
    methods = list(study.search) if study else ["sgd", "sam", "fsam"]
    conditions = list(study.conditions) if study else list(table.index)
    return table.reindex(index=[c for c in conditions if c in table.index],
                         columns=[m for m in methods if m in table.columns])


def differences_layout(differences: pd.DataFrame, study: Study) -> pd.DataFrame:
    """The paired differences as conditions (in the study's order) by pairs (in PAIRS' order)."""
    table = differences.pivot(index="condition", columns="pair", values="cell")
    pairs = [f"{a} - {b}" for a, b in PAIRS]
    return table.reindex(index=[c for c in study.conditions if c in table.index],
                         columns=[p for p in pairs if p in table.columns])


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown() if not frame.empty else "(nothing to show)"


def report_text(collected: Collected, tables: dict[str, pd.DataFrame]) -> str:
    study = collected.study
    lines = [f"# The {study.name} comparison", "",
             f"Cells: {SPREAD}. Seeds 1..{study.seeds} at each method's choice; chosen by {study.select} on the "
             "validation split, never the test split. Differences: per seed, a − b of the final-epoch test top-1, "
             "mean and 95 % t interval; an interval that contains 0 is no difference.", ""]
    for value, title in (("final_top1", "Final-epoch test top-1 (%): the headline"),
                         ("test_top1_at_best_val", "Test top-1 at the best validation epoch (%)"),
                         ("train_fit_top1", "Fit to the training labels as trained (%; eval mode)"),
                         ("train_clean_top1", "Agreement with the clean training labels (%; eval mode)"),
                         ("ema_cosine_mean", "F-SAM: cosine of its EMA to the full gradient, mean over training"),
                         ("ema_cosine_last", "F-SAM: cosine of its EMA to the full gradient, last measurement")):
        layout = results_layout(tables["results"], value, study)
        if not layout.empty:
            lines += [f"## {title}", "", _markdown(layout), ""]
    measured = {value.removeprefix("sharpness.") for value in tables["results"]["value"] if value.startswith("sharpness.")}
    for value in (f"sharpness.{metric}" for metric in sharpness_metrics(measured)):
        lines += [f"## Sharpness (diagnostic): {metric_title(value.removeprefix('sharpness.'))}", "",
                  _markdown(results_layout(tables["results"], value, study)), ""]
    if not tables["differences"].empty:
        lines += ["## Paired differences of the final-epoch test top-1 (points)", "",
                  _markdown(differences_layout(tables["differences"], study)), ""]
    chosen = tables["chosen"].round({study.select: 2})
    chosen = chosen.astype(object).where(chosen.notna(), "")  # a key the method lacks: blank
    lines += ["## Each method's choice", "", chosen.to_markdown(index=False), ""]
    if not tables["heatmap"].empty:
        grid = tables["heatmap"].assign(cell=[_cell(row.mean, row.std, int(row.n))
                                              for row in tables["heatmap"].itertuples()])
        lines += [f"## F-SAM at {study.heatmap_condition}: final-epoch validation top-1 (%), λ (rows) × σ (columns)",
                  "", _markdown(grid.pivot(index="lmbda", columns="sigma", values="cell")), ""]
    if collected.missing:
        lines += ["## Runs left out", "", *[f"- {line}" for line in collected.missing], ""]
    return "\n".join(lines)


def write_report(collected: Collected, out_dir: Path) -> list[Path]:
    """The tables (Markdown report, numeric CSVs) and figures (curves per condition, the heatmap) under
    ``out_dir``; returns the paths written. Every file is replaced whole or not at all."""
    from fsam.report.figures import lambda_sigma_heatmap

    tables = comparison_tables(collected)
    written = []
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        path = out_dir / "tables" / f"{name}.csv"
        write_atomic(path, frame.to_csv(index=False))
        written.append(path)
    report = out_dir / "tables" / "comparison.md"
    write_atomic(report, report_text(collected, tables) + "\n")
    written.append(report)
    latex = {"final_top1": (results_layout(tables["results"], "final_top1", collected.study),
                            f"Final-epoch test top-1 (%), {SPREAD}, each method at its choice on validation")}
    if not tables["differences"].empty:
        latex["differences"] = (differences_layout(tables["differences"], collected.study),
                                "Per-seed differences of the final-epoch test top-1 (points), mean and 95 % t "
                                "interval; an interval that contains 0 is no difference")
    for name, (frame, caption) in latex.items():
        path = out_dir / "tables" / f"{name}.tex"
        write_atomic(path, to_latex(frame, caption, f"tab:{collected.study.name}-{name}"))
        written.append(path)
    written += curves_figure(collected, out_dir / "figures")
    heatmap = tables["heatmap"].rename(columns={"mean": "final_val_top1_mean"})
    runs = [run for point in collected.heatmap.values() for run in point]
    if not heatmap.empty and runs:
        # What the heatmap's runs share, for its labels: the data, the network and F-SAM's other choices there.
        first = runs[0].summary
        noise = first["data"].get("label_noise") or {"kind": "none", "ratio": 0.0}
        choice = collected.chosen[(collected.study.heatmap_condition, "fsam")]
        values = {item.split("=", 1)[0].removeprefix("optimizer."): float(item.split("=", 1)[1])
                  for item in choice.overrides if item.startswith("optimizer.")}
        summary = heatmap.assign(optimizer="fsam", dataset=first["data"]["dataset"], model=first["model"]["label"],
                                 noise=noise["kind"], noise_ratio=noise["ratio"], rho=values.get("rho"),
                                 lr=values.get("lr"), weight_decay=values.get("weight_decay"), epochs=first["epochs"])
        written += lambda_sigma_heatmap(summary, out_dir / "figures", metric="final_val_top1",
                                        label="final-epoch validation top-1 (%)")
    return written


def curves_figure(collected: Collected, folder: Path) -> list[Path]:
    """Per condition (columns): test top-1 and the training loss against the epoch, each method's mean over its
    seeds with a ± 1 std band, in the method's colour."""
    import matplotlib.pyplot as plt

    from fsam.report.figures import METHOD_COLORS, _save
    from fsam.report.tables import METHOD_NAMES

    conditions = list(collected.study.conditions)
    figure, axes = plt.subplots(2, len(conditions), figsize=(3.6 * len(conditions), 6.4), squeeze=False)
    for column, condition in enumerate(conditions):
        for method in collected.study.search:
            runs = collected.seeds.get((condition, method), [])
            if not runs:
                continue
            for row, key in enumerate(("test_top1", "train_loss")):
                curves = np.array([[epoch[key] for epoch in run.metrics] for run in runs], dtype=float)
                epochs = np.arange(1, curves.shape[1] + 1)
                mean = curves.mean(axis=0)
                spread = curves.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
                color = METHOD_COLORS.get(method, "black")
                axes[row][column].plot(epochs, mean, color=color, label=f"{METHOD_NAMES.get(method, method)} (n={len(runs)})")
                axes[row][column].fill_between(epochs, mean - spread, mean + spread, color=color, alpha=0.2)
        axes[0][column].set_title(condition)
        axes[0][column].set(ylabel="test top-1 (%)")
        axes[1][column].set(xlabel="epoch", ylabel="training loss (labels as trained)", yscale="log")
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{collected.study.name}: each method at its choice, mean ± 1 std over seeds")
    figure.tight_layout()
    return _save(figure, folder, "curves")
