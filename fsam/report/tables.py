"""Tables from run folders: seeds aggregated, laid out like the paper's main tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# Shown beside each setting (they describe it; the setting's digest is what groups seeds).
DESCRIBE_COLUMNS = ["dataset", "noise", "noise_ratio", "model", "optimizer", "lr", "weight_decay", "rho", "sigma",
                    "lmbda", "epochs", "batch_size"]
METHOD_ORDER = ["sgd", "sam", "fsam", "asam", "fasam"]
# The cells of the paper's main CIFAR table (Li et al., CVPR 2024); their values could not be obtained.
PAPER_MODELS = ["resnet18", "wrn28_10", "pyramidnet110"]
PAPER_DATASETS = ["cifar10", "cifar100"]
PAPER_METHODS = ["sgd", "sam", "fsam"]


def summarise(runs: pd.DataFrame, metric: str = "best_top1") -> pd.DataFrame:
    """Mean, standard deviation and number of seeds of ``metric`` over the finished runs of each setting.

    One row per setting (runs differing in anything but the seed and the free keys are never averaged); the
    describing columns are the setting's values. ``std`` is empty for a single seed.
    """
    finished = runs[runs.get("status", pd.Series(dtype=str)) == "finished"] if len(runs) else runs
    columns = [c for c in DESCRIBE_COLUMNS if c in finished]
    if finished.empty or metric not in finished:
        return pd.DataFrame(columns=["setting", *DESCRIBE_COLUMNS, "mean", "std", "seeds"])
    grouped = finished.groupby("setting", sort=True)
    table = grouped[columns].first()
    table["mean"] = grouped[metric].mean()
    table["std"] = grouped[metric].std()  # NaN for one seed: there is no spread to show
    table["seeds"] = grouped[metric].count()
    return table.reset_index()


def paper_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows dataset/model, columns methods, cells ``mean ± std (n)``; empty cells for settings never run."""
    if summary.empty:
        return pd.DataFrame()
    cells = summary.assign(cell=[
        f"{m:.2f} ± {s:.2f} ({int(n)})" if n > 1 else f"{m:.2f} ({int(n)})"
        for m, s, n in zip(summary["mean"], summary["std"], summary["seeds"])
    ])
    wide = cells.pivot_table(index=["dataset", "model"], columns="optimizer", values="cell", aggfunc="first")
    ordered = [m for m in METHOD_ORDER if m in wide.columns] + [m for m in wide.columns if m not in METHOD_ORDER]
    return wide[ordered].fillna("")


def reference_table(known_results_csv: str | Path) -> pd.DataFrame:
    """The published numbers we could verify (with source) and the paper's main-table cells marked as such."""
    known = pd.read_csv(known_results_csv)
    rows = [
        {"source": r.source, "dataset": r.dataset, "model": r.model, "optimizer": r.optimizer,
         "metric": r.metric, "value": f"{r.value:.2f}", "note": r.note if isinstance(r.note, str) else ""}
        for r in known.itertuples()
    ]
    for dataset in PAPER_DATASETS:
        for model in PAPER_MODELS:
            for method in PAPER_METHODS:
                rows.append({"source": "paper-table (main CIFAR results)", "dataset": dataset, "model": model,
                             "optimizer": method, "metric": "top1", "value": "not available",
                             "note": "the paper's table could not be obtained; never filled by hand"})
    return pd.DataFrame(rows)
