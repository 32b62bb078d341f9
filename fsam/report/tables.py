"""Tables from run folders: one row per setting (seeds aggregated), the paper's layout, the published numbers.

    runs = load_runs("runs/")
    settings = summarise(runs, seeds_expected=3)         # one row per setting: mean, std and n of each metric
    layout = paper_layout(settings, "final_top1", load_known("results/known-results.csv"))
    layout.table, layout.values, layout.notes            # the cells as text and as numbers; what was chosen

Runs are grouped by their setting's digest (what they compute), never by a fixed list of keys. Only finished runs
are averaged; unfinished, running and diverged ones are counted beside them. ± is the sample standard deviation
over seeds (n − 1 denominator).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fsam.report.sharpness import PARTS as SHARPNESS_PARTS
from fsam.report.sharpness import format_sharpness, metric_title, sharpness_metrics, summarise_sharpness
from fsam.runfolder import DIGEST_LENGTH

# The epoch a figure comes from, headline first: the last (nothing chosen), the best by validation accuracy (runs
# with dataset.val_split only: chosen without the test split), and the best by test accuracy, as the paper reports,
# only as a diagnostic: an epoch chosen on the test set overstates what a model chosen without it scores.
METRICS = {"final_top1": "final-epoch test top-1 (%)",
           "test_top1_at_best_val": "test top-1 at the best validation epoch (%)",
           "best_top1": "test top-1 at the best test epoch (%; diagnostic: chosen on the test set)"}
CHOSEN = {"final_top1": "the last epoch's test top-1, no epoch is chosen",
          "test_top1_at_best_val": "the test top-1 at the epoch of the best validation top-1 (runs with a validation "
                                   "split, dataset.val_split)",
          "best_top1": "the highest test top-1 of any epoch, so the epoch is chosen on the test set and the number "
                       "overstates what a model chosen without it scores: a diagnostic, not a result"}
SPREAD = ("Cells: mean ± sample standard deviation over the finished seeds (n − 1 denominator; no ± for one seed), "
          "n finished seeds")
KNOWN_METRIC = {"best_top1": "top1_best", "final_top1": "top1_final"}
STATES = ("unfinished", "running", "diverged")
# Shown beside each setting; the hyperparameters a method never reads are empty (fsam.report.runs).
DESCRIBE_COLUMNS = ["dataset", "noise", "noise_ratio", "model", "optimizer", "base", "lr", "weight_decay", "rho",
                    "sigma", "lmbda", "epochs", "batch_size"]
METHOD_ORDER = ["sgd", "sam", "sam-full-gradient-only", "sam-noise-only", "fsam", "asam", "fasam"]
METHOD_NAMES = {"sgd": "SGD", "sam": "SAM", "sam-full-gradient-only": "SAM (full gradient only)",
                "sam-noise-only": "SAM (noise part only)", "fsam": "F-SAM", "asam": "ASAM", "fasam": "F-ASAM"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet", "digits": "digits"}
# The cells of the paper's main CIFAR table (Li et al., CVPR 2024); their values could not be obtained.
PAPER_MODELS = ["resnet18", "wrn28_10", "pyramidnet110"]
PAPER_DATASETS = ["cifar10", "cifar100"]
PAPER_METHODS = ["sgd", "sam", "fsam"]
# Columns of known-results.csv that, where filled, must match the setting for a published number to apply.
KNOWN_MATCH = {"rho": "rho", "lambda": "lmbda", "sigma": "sigma", "epochs": "epochs", "batch": "batch_size"}
# The same for the recipe's other choices, by name: the initialisation (ours or the release's) and whether each
# epoch's last partial batch is trained on (a number of the authors' release applies only to their recipe).
KNOWN_RECIPE = ("init", "last_batch")
# What may tell two settings of one method apart in a label, in the order it is named, and how it is written.
VARIANT_KEYS = {"lr": "lr", "weight_decay": "wd", "rho": "ρ", "sigma": "σ", "lmbda": "λ", "epochs": "epochs",
                "batch_size": "batch", "base": "base"}


def summarise(runs: pd.DataFrame, seeds_expected: int | None = None) -> pd.DataFrame:
    """One row per setting: its describing columns; for each metric the mean, the sample standard deviation (n − 1
    denominator, only with two or more seeds) and n, over its finished runs; the counts of unfinished, running and
    diverged runs (never averaged); ``short`` when fewer finished seeds than ``seeds_expected``. Sharpness metrics
    measured on some run add their mean, std, n, options and runs left out
    (:func:`fsam.report.sharpness.summarise_sharpness`)."""
    columns = ["setting", *DESCRIBE_COLUMNS, "n", *STATES, "short"]
    columns += [f"{metric}_{part}" for metric in METRICS for part in ("mean", "std")]
    measured = sharpness_metrics(runs.columns)
    columns += [f"{metric}_{part}" for metric in measured for part in SHARPNESS_PARTS]
    if runs.empty or "setting" not in runs:
        return pd.DataFrame(columns=columns)
    rows = []
    for setting, group in runs[runs["setting"].notna()].groupby("setting", sort=True):
        finished = group[group["status"] == "finished"]
        first = (finished if len(finished) else group).iloc[0]
        row: dict[str, Any] = {"setting": setting, **{c: first.get(c) for c in (*DESCRIBE_COLUMNS, *KNOWN_RECIPE)},
                               "n": len(finished)}
        row.update({state: int((group["status"] == state).sum()) for state in STATES})
        row["short"] = seeds_expected is not None and len(finished) < seeds_expected
        for metric in METRICS:
            values = finished[metric].astype(float) if metric in finished else pd.Series(dtype=float)
            row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) >= 2 else math.nan
        row.update(summarise_sharpness(finished, measured))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def setting_labels(settings: pd.DataFrame) -> dict[str, str]:
    """A label per setting: the method's name, plus the values that differ between settings of it; where those do
    not tell two settings apart (they differ in a key not shown, such as the augmentation), the end of the setting's
    name (its digest) is added to each of them."""
    labels = {}
    for method, group in settings.groupby("optimizer"):
        varying = [key for key in VARIANT_KEYS if key in group and group[key].nunique(dropna=False) > 1]
        for _, row in group.iterrows():
            extra = ", ".join(f"{VARIANT_KEYS[key]} {row[key]:g}" if isinstance(row[key], float)
                              else f"{VARIANT_KEYS[key]} {row[key]}" for key in varying)
            labels[row["setting"]] = METHOD_NAMES.get(method, method) + (f" ({extra})" if extra else "")
    alike = Counter(labels.values())
    return {setting: label if alike[label] == 1 else f"{label} [{setting[-DIGEST_LENGTH:]}]"
            for setting, label in labels.items()}


def format_cell(mean: float, std: float, n: int, counts: dict[str, int] | None = None, short: bool = False) -> str:
    """``81.32 ± 0.12 (n=3)``: mean ± sample standard deviation; no ± for one seed; ``—`` without a finished run;
    other runs counted after it."""
    text = "—" if n == 0 or math.isnan(mean) else f"{mean:.2f}" + (f" ± {std:.2f}" if n >= 2 else "")
    extra = [f"n={n}"] + [f"{count} {state}" for state, count in (counts or {}).items() if count]
    return f"{text} ({'; '.join(extra)})" + (" †" if short else "")


def load_known(path: str | Path) -> pd.DataFrame:
    """The published numbers we could verify (``results/known-results.csv``), with their sources."""
    return pd.read_csv(path)


def published_value(known: pd.DataFrame, row: pd.Series, metric: str) -> tuple[float, str] | None:
    """The published ``metric`` for the setting ``row`` and its source, where known-results.csv has one for its
    data set, model, method and every hyperparameter and recipe choice (:data:`KNOWN_RECIPE`) the CSV fills in."""
    if known is None or known.empty or metric not in KNOWN_METRIC:
        return None
    candidates = known[
        (known["dataset"] == row["dataset"]) & (known["model"] == row["model"])
        & (known["optimizer"] == row["optimizer"]) & (known["metric"] == KNOWN_METRIC[metric])
    ]
    for _, entry in candidates.iterrows():
        if all(
            pd.isna(entry[column]) or (row.get(key) is not None and not pd.isna(row.get(key))
                                       and math.isclose(float(entry[column]), float(row[key])))
            for column, key in KNOWN_MATCH.items()
        ) and all(pd.isna(entry.get(column)) or entry.get(column) == row.get(column) for column in KNOWN_RECIPE):
            return float(entry["value"]), str(entry["source"])
    return None


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def settings_caption(metrics: list[str]) -> str:
    """What the per-setting table of ``metrics`` shows and how each number was chosen."""
    chosen = " ".join(f"{_sentence(METRICS[metric])}: {CHOSEN[metric]}." for metric in metrics)
    return f"Results per setting. {SPREAD}. {chosen}"


def layout_caption(metric: str) -> str:
    """What ``metric``'s paper layout shows, how its numbers were chosen, and what its published column holds."""
    return (f"{_sentence(METRICS[metric])}: {CHOSEN[metric]}. {SPREAD}. Published: the published value with its "
            "source and our difference (Δ); not available where none could be obtained for that setting.")


@dataclass
class Layout:
    """The paper layout of one metric: ``table`` (rows data set x model, two columns per method: the result and
    the published value with the difference, as text), ``values`` (the same cells as numbers, one row per cell)
    and ``notes`` (which setting a cell shows when it has several)."""

    metric: str
    table: pd.DataFrame
    values: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)


def row_label(row: pd.Series) -> tuple[str, str]:
    dataset = DATASET_NAMES.get(row["dataset"], row["dataset"])
    if row.get("noise") not in (None, "none") and not pd.isna(row.get("noise")):
        dataset += f" ({row['noise']} {100 * float(row['noise_ratio']):g}% noise)"
    return dataset, str(row["model"])


def paper_layout(summary: pd.DataFrame, metric: str, known: pd.DataFrame | None = None) -> Layout:
    """Rows data set x model, columns methods; a cell with several settings shows the one with the most finished
    seeds (then the first by name) and says so in ``notes``, naming the others; never chosen by accuracy."""
    layout = Layout(metric, pd.DataFrame())
    if summary.empty:
        return layout
    cells: dict[tuple[str, str], dict[str, str]] = {}
    values = []
    methods = [m for m in METHOD_ORDER if m in set(summary["optimizer"])]
    methods += sorted(set(summary["optimizer"]) - set(methods))
    for (dataset, method), group in summary.groupby([summary.apply(row_label, axis=1), "optimizer"], sort=False):
        chosen = group.sort_values(["n", "setting"], ascending=[False, True]).iloc[0]
        if len(group) > 1:
            others = ", ".join(s for s in sorted(group["setting"]) if s != chosen["setting"])
            layout.notes.append(
                f"{dataset[0]} / {dataset[1]} / {METHOD_NAMES.get(method, method)}: {len(group)} settings; shown "
                f"{chosen['setting']} (most finished seeds, n={chosen['n']}); also run: {others} (see the per-setting table)"
            )
        counts = {state: int(chosen[state]) for state in STATES}
        name = METHOD_NAMES.get(method, method)
        row = cells.setdefault(dataset, {})
        mean, std, n = chosen[f"{metric}_mean"], chosen[f"{metric}_std"], int(chosen["n"])
        row[name] = format_cell(mean, std, n, counts, bool(chosen["short"]))
        value, source = published_value(known, chosen, metric) or (math.nan, None)
        if source is None:
            row[f"{name} published"] = "not available"
        else:
            difference = "" if math.isnan(mean) else f", Δ {mean - value:+.2f}"
            row[f"{name} published"] = f"{value:.2f} [{source}]{difference}"
        values.append({"dataset": dataset[0], "model": dataset[1], "method": name, "setting": chosen["setting"],
                       "mean": mean, "std": std, "n": n, **counts, "short": bool(chosen["short"]),
                       "published": value, "published_source": source, "difference": mean - value})
    ordered = [column for method in methods for column in
               (METHOD_NAMES.get(method, method), f"{METHOD_NAMES.get(method, method)} published")]
    table = pd.DataFrame.from_dict(cells, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["data set", "model"])
    layout.table = table.reindex(columns=ordered).fillna("").sort_index()
    order = {METHOD_NAMES.get(method, method): position for position, method in enumerate(methods)}
    layout.values = pd.DataFrame(sorted(values, key=lambda cell: (cell["dataset"], cell["model"],
                                                                  order[cell["method"]])))
    return layout


def reported_metrics(summary: pd.DataFrame) -> list[str]:
    """The metrics of ``METRICS``, headline first, that some setting has a value for (the validation pick only
    with a validation split); the final and best test epochs always."""
    return [metric for metric in METRICS
            if metric in ("final_top1", "best_top1") or summary[f"{metric}_mean"].notna().any()]


def settings_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-setting table as it is printed: describing columns, then ``mean ± std (n)`` per metric, then per
    sharpness metric measured (:func:`fsam.report.sharpness.format_sharpness`)."""
    table = summary[["setting", *DESCRIBE_COLUMNS]].copy()
    for metric in reported_metrics(summary):
        title = METRICS[metric]
        table[title] = [
            format_cell(row[f"{metric}_mean"], row[f"{metric}_std"], int(row["n"]),
                        {state: int(row[state]) for state in STATES}, bool(row["short"]))
            for _, row in summary.iterrows()
        ]
    for metric in sharpness_metrics(summary.columns):
        table[metric_title(metric)] = [
            format_sharpness(row[f"{metric}_mean"], row[f"{metric}_std"], int(row[f"{metric}_n"]),
                             int(row[f"{metric}_left_out"])) for _, row in summary.iterrows()
        ]
    if (table["noise"] == "none").all():
        table = table.drop(columns=["noise", "noise_ratio"])
    table = table.dropna(axis="columns", how="all")
    return table.astype(object).where(table.notna(), "")  # a key the method does not read is blank, not "nan"


def settings_numbers(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-setting table with its numbers as numbers, to sort and plot (the wandb report): the columns of
    :func:`settings_table` (a hyperparameter the method does not read is empty, not ""), beside each formatted cell
    its mean and std, then n and the counts of the runs not averaged."""
    formatted = settings_table(summary)
    table = summary[[column for column in formatted if column in summary]].copy()
    for metric in reported_metrics(summary):
        table[METRICS[metric]] = formatted[METRICS[metric]]
        table[f"{metric}_mean"], table[f"{metric}_std"] = summary[f"{metric}_mean"], summary[f"{metric}_std"]
    return table.join(summary[["n", *STATES]])


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (``\\usepackage{booktabs}``) ready for a paper: index columns first, escaped text."""
    frame = table.reset_index() if not isinstance(table.index, pd.RangeIndex) else table
    header = " & ".join(_latex_escape(str(column)) for column in frame.columns) + r" \\"
    body = [" & ".join(_latex_escape(_latex_cell(value)) for value in row) + r" \\" for row in frame.itertuples(index=False)]
    return "\n".join([
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        r"\begin{tabular}{" + "l" * len(frame.columns) + "}",
        r"\toprule",
        header,
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
        "",
    ])


def _latex_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "−": r"$-$", "†": r"$^\dagger$"}
    return "".join(replacements.get(character, character) for character in text)


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
