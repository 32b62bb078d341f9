"""Figures from run folders: learning curves with a band over seeds, the λ × σ heatmap, accuracy against label noise,
how well F-SAM's EMA estimated the full gradient (runs trained with ``trainer.full_grad_analysis_every``), and from
runs measured by ``scripts/sharpness.py`` the loss along a random direction and accuracy against λ_max.

Each function draws one kind of figure per data set and model found, saves it as PNG and PDF and returns the
paths written. One colour per method throughout (:data:`METHOD_COLORS`), so a method looks the same in every
figure. Curves and points are means over the finished seeds of one setting; bands and error bars are ± one
standard deviation (drawn only with two or more seeds).
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fsam.report.runs import load_metrics  # noqa: E402
from fsam.report.sharpness import read_measurements  # noqa: E402
from fsam.report.tables import (  # noqa: E402
    METHOD_NAMES, METHOD_ORDER, METRICS, VARIANT_KEYS, row_label, setting_labels,
)

METHOD_COLORS = {"sgd": "#7f7f7f", "sam": "#1f77b4", "fsam": "#d62728", "asam": "#2ca02c", "fasam": "#ff7f0e",
                 "sam-full-gradient-only": "#17becf", "sam-noise-only": "#9467bd"}
LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]


def _save(figure: plt.Figure, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".pdf"):
        path = folder / f"{stem}{suffix}"
        temporary = folder / f".{stem}.tmp{suffix}"
        figure.savefig(temporary, dpi=150, bbox_inches="tight")
        temporary.replace(path)  # an old figure is replaced only by a complete one
        paths.append(path)
    plt.close(figure)
    return paths


def _slug(*parts: str) -> str:
    """``("digits (symmetric 20% noise)", "pyramidnet8")`` -> ``digits-symmetric-20-noise_pyramidnet8``."""
    words = ["-".join("".join(c if c.isalnum() else " " for c in str(part)).split()) for part in parts]
    return "_".join(words)


def _equal(a: object, b: object) -> bool:
    if pd.isna(a) and pd.isna(b):
        return True
    return a == b


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def one_setting_per_method(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The runs of one setting per data set, model and method: the one with the most finished seeds (then the
    first by name), as in the tables' paper layout; and a note for each setting left out."""
    finished = runs["status"] == "finished"
    counts = runs[finished].groupby("setting").size()
    keep, notes = [], []
    for _, group in runs.groupby([runs.apply(row_label, axis=1), "optimizer"]):
        settings = sorted(set(group["setting"]), key=lambda setting: (-counts.get(setting, 0), setting))
        keep.append(settings[0])
        notes += [f"curves: left out {setting} (another setting of its method has more seeds; --all-settings "
                  "draws it)" for setting in settings[1:]]
    return runs[runs["setting"].isin(keep)], notes


def learning_curves(runs: pd.DataFrame, folder: Path, *, all_settings: bool = False) -> tuple[list[Path], list[str]]:
    """Per data set and model: test top-1 (%) and training loss against the epoch, one line per method (mean over
    the finished seeds of its setting with the most seeds; unfinished runs when it has none) with a ± std band.
    ``all_settings`` draws every setting, one line style each within a method's colour. Returns the paths
    written and notes on what was left out."""
    written: list[Path] = []
    usable = runs[runs["setting"].notna()].copy()
    if usable.empty:
        return written, []
    notes: list[str] = []
    if not all_settings:
        usable, notes = one_setting_per_method(usable)
    usable["panel"] = usable.apply(row_label, axis=1)
    for (dataset, model), panel in usable.groupby("panel"):
        figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
        settings = panel.drop_duplicates("setting")
        labels = setting_labels(settings)
        ordered = sorted(settings.itertuples(), key=lambda row: (_method_key(row.optimizer), labels[row.setting]))
        styles = LINE_STYLES
        seen_per_method: dict[str, int] = {}
        for setting in ordered:
            members = panel[panel["setting"] == setting.setting]
            finished = members[members["status"] == "finished"]
            chosen = finished if len(finished) else members
            curves = [load_metrics(path) for path in chosen["run_dir"]]
            curves = [curve.set_index("epoch") for curve in curves if not curve.empty and "epoch" in curve]
            if not curves:
                continue
            style = styles[seen_per_method.get(setting.optimizer, 0) % len(styles)]
            seen_per_method[setting.optimizer] = seen_per_method.get(setting.optimizer, 0) + 1
            color = METHOD_COLORS.get(setting.optimizer, "black")
            label = f"{labels[setting.setting]}, n={len(curves)}" + ("" if len(finished) else " (unfinished)")
            for axis, key in ((accuracy_axis, "test_top1"), (loss_axis, "train_loss")):
                stacked = pd.concat([curve[key] for curve in curves], axis=1)
                mean, std = stacked.mean(axis=1), stacked.std(axis=1)
                axis.plot(mean.index, mean.values, linestyle=style, color=color, label=label, linewidth=1.8)
                if len(curves) >= 2:
                    axis.fill_between(mean.index, (mean - std).values, (mean + std).values, color=color, alpha=0.18,
                                      linewidth=0)
        accuracy_axis.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="Test accuracy")
        loss_axis.set(xlabel="epoch", ylabel="training loss (cross-entropy, nats)", title="Training loss")
        for axis in (accuracy_axis, loss_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.suptitle(f"{dataset}, {model}: mean over seeds, band ± 1 std")
        figure.tight_layout()
        written += _save(figure, folder, f"curves_{_slug(dataset, model)}")
    return written, notes


def lambda_sigma_heatmap(summary: pd.DataFrame, folder: Path, metric: str = "final_top1",
                         label: str | None = None) -> list[Path]:
    """Per data set and model: F-SAM's mean ``metric`` over λ (rows) × σ (columns), each cell annotated with its
    mean and n; drawn where at least two λ or two σ values have finished runs. ``label`` names a metric that is
    not one of :data:`METRICS` (``summary`` then has its ``<metric>_mean`` column)."""
    label = label or METRICS[metric]
    written: list[Path] = []
    fsam = summary[(summary["optimizer"] == "fsam") & (summary["n"] > 0)]
    if fsam.empty:
        return written
    for (dataset, model), group in fsam.groupby(fsam.apply(row_label, axis=1)):
        if group["lmbda"].nunique() < 2 and group["sigma"].nunique() < 2:
            continue
        others = [key for key in ("rho", "lr", "weight_decay", "epochs") if group[key].nunique() > 1]
        if others:
            group = group[(group[others] == group[others].iloc[0]).all(axis=1)]  # one slice: the first's values
        grid = group.pivot_table(index="lmbda", columns="sigma", values=f"{metric}_mean", aggfunc="first")
        counts = group.pivot_table(index="lmbda", columns="sigma", values="n", aggfunc="first")
        figure, axis = plt.subplots(figsize=(1.3 * len(grid.columns) + 2.5, 0.8 * len(grid.index) + 1.8))
        axis.set_facecolor("#eeeeee")  # cells never run
        image = axis.imshow(grid.values, cmap="viridis", aspect="auto", origin="lower")
        low, high = np.nanmin(grid.values), np.nanmax(grid.values)
        axis.set_xticks(range(len(grid.columns)), [f"{value:g}" for value in grid.columns])
        axis.set_yticks(range(len(grid.index)), [f"{value:g}" for value in grid.index])
        axis.set(xlabel="σ (share of the EMA removed)", ylabel="λ (EMA decay)")
        for i in range(len(grid.index)):
            for j in range(len(grid.columns)):
                value = grid.values[i, j]
                if np.isnan(value):
                    axis.text(j, i, "not run", ha="center", va="center", color="#777777", fontsize=8)
                    continue
                bright = high > low and (value - low) / (high - low) > 0.6  # dark text on viridis' yellow end
                axis.text(j, i, f"{value:.2f}\nn={int(counts.values[i, j])}", ha="center", va="center",
                          color="black" if bright else "white", fontsize=8)
        figure.colorbar(image, ax=axis, label=label)
        fixed = ", ".join(f"{VARIANT_KEYS[key]} {group[key].iloc[0]:g}" for key in ("rho", "lr", "epochs") if key in group)
        axis.set_title(f"F-SAM on {dataset}, {model}: {label}\n({fixed})", fontsize=10)
        figure.tight_layout()
        written += _save(figure, folder, f"heatmap_lambda_sigma_{_slug(dataset, model)}")
    return written


def noise_plot(summary: pd.DataFrame, folder: Path, metric: str = "final_top1") -> list[Path]:
    """Per data set, model and noise kind: ``metric`` against the label-noise rate, one line per method (the
    clean runs of the same data set and model are the 0 % point); error bars ± 1 std."""
    written: list[Path] = []
    finished = summary[summary["n"] > 0].copy()
    noisy = finished[finished["noise"].notna() & (finished["noise"] != "none")]
    if noisy.empty:
        return written
    for (dataset, model, kind), group in noisy.groupby(["dataset", "model", "noise"]):
        clean = finished[(finished["dataset"] == dataset) & (finished["model"] == model)
                         & (finished["noise"] == "none")].assign(noise_ratio=0.0)
        points = pd.concat([clean, group])
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        for method, line in sorted(points.groupby("optimizer"), key=lambda item: _method_key(item[0])):
            # one point per rate: the clean setting with the noisy runs' hyperparameters if there is one, then the
            # one with the most seeds (never the most accurate)
            reference = group[group["optimizer"] == method].iloc[0] if (group["optimizer"] == method).any() else None
            keys = [key for key in VARIANT_KEYS if key in line]
            line = line.assign(same=[
                reference is not None and all(_equal(row[key], reference[key]) for key in keys)
                for _, row in line.iterrows()
            ])
            line = line.sort_values(["noise_ratio", "same", "n", "setting"], ascending=[True, False, False, True])
            line = line.drop_duplicates("noise_ratio")
            axis.errorbar(100 * line["noise_ratio"].astype(float), line[f"{metric}_mean"],
                          yerr=line[f"{metric}_std"].fillna(0.0), marker="o", capsize=3,
                          color=METHOD_COLORS.get(method, "black"), label=METHOD_NAMES.get(method, method))
        axis.set(xlabel=f"{kind} label noise (% of training labels)", ylabel=METRICS[metric],
                 title=f"{dict(cifar10='CIFAR-10', cifar100='CIFAR-100').get(dataset, dataset)}, {model}: "
                       f"accuracy against {kind} label noise\nmean over seeds, bars ± 1 std (n ≥ 2)")
        axis.set_xticks(sorted({100 * float(ratio) for ratio in points["noise_ratio"]}))
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        written += _save(figure, folder, f"noise_{_slug(dataset, model, kind)}")
    return written


def ema_agreement(runs: pd.DataFrame, folder: Path) -> list[Path]:
    """Per run that measured F-SAM's EMA against the full gradient: the cosine and the relative error
    ||EMA - full|| / ||full|| against the training step, one figure per run (the measurements are per step, so
    seeds are not averaged). Returns the paths written."""
    written: list[Path] = []
    for run in runs.itertuples():
        metrics = load_metrics(run.run_dir)
        if metrics.empty or "analysis" not in metrics:
            continue
        records = pd.DataFrame([record for entries in metrics["analysis"].dropna() for record in entries])
        if records.empty:
            continue
        figure, (cosine_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
        color = METHOD_COLORS.get(run.optimizer, "black")
        cosine_axis.plot(records["step"], records["ema_cosine"], "o-", color=color, markersize=3)
        error_axis.plot(records["step"], records["ema_relative_error"], "o-", color=color, markersize=3)
        cosine_axis.set(xlabel="training step", ylabel="cosine(EMA, full gradient)", title="Direction")
        error_axis.set(xlabel="training step", ylabel="||EMA − full|| / ||full||", title="Relative error")
        for axis in (cosine_axis, error_axis):
            axis.grid(alpha=0.3)
        dataset, model = row_label(pd.Series(run._asdict()))
        figure.suptitle(f"{dataset}, {model}, {METHOD_NAMES.get(run.optimizer, run.optimizer)} seed {run.seed}: "
                        "the EMA against the exact full-batch gradient")
        figure.tight_layout()
        written += _save(figure, folder, f"ema_vs_full_gradient_{_slug(run.setting, f'seed{run.seed}')}")
    return written


def _most_common_options(records: dict[str, dict], run_dirs: list[str]) -> tuple[list[str], list[str]]:
    """The run folders among ``run_dirs`` whose record (``records[run_dir]``, with its ``options``) was measured
    with the options most of them used (a tie: the first in sorted order), and the others."""
    keys = {run_dir: json.dumps(records[run_dir]["options"], sort_keys=True) for run_dir in run_dirs}
    counts = Counter(keys.values())
    chosen = sorted(counts, key=lambda key: (-counts[key], key))[0]
    return ([run_dir for run_dir in run_dirs if keys[run_dir] == chosen],
            [run_dir for run_dir in run_dirs if keys[run_dir] != chosen])


def _measured_by_panel(runs: pd.DataFrame, quantity: str, noun: str) -> tuple[list, list[str]]:
    """The finished runs measured with ``quantity`` (``slice1d``, ``slice2d``) per (data set, model) panel: each
    method's setting with the most seeds, in the methods' order, as (setting row, label, the results of its seeds
    measured with the options most of them used); and a note for each seed left out (``noun``: what it is)."""
    notes: list[str] = []
    finished = runs[(runs["status"] == "finished") & runs["setting"].notna()]
    records = {run_dir: read_measurements(run_dir).get(quantity) for run_dir in finished["run_dir"]}
    measured = finished[[records[run_dir] is not None for run_dir in finished["run_dir"]]]
    if measured.empty:
        return [], notes
    measured, _ = one_setting_per_method(measured)
    panels = []
    for key, panel in measured.groupby(measured.apply(row_label, axis=1)):
        settings = panel.drop_duplicates("setting")
        labels = setting_labels(settings)
        entries = []
        for setting in sorted(settings.itertuples(), key=lambda row: (_method_key(row.optimizer), labels[row.setting])):
            seeds = list(panel[panel["setting"] == setting.setting]["run_dir"])
            members, left_out = _most_common_options(records, seeds)
            notes += [f"{noun}s: left out {run_dir} (its {noun} was measured with other options than its setting's "
                      "other seeds)" for run_dir in left_out]
            entries.append((setting, labels[setting.setting], [records[run_dir]["result"] for run_dir in members]))
        panels.append((key, entries))
    return panels, notes


def loss_slices(runs: pd.DataFrame, folder: Path) -> tuple[list[Path], list[str]]:
    """Per data set and model: the loss along a filter-normalised random direction (``scripts/sharpness.py --what
    slice1d``) against the step α, one line per method in its colour: the mean over the finished seeds of its
    setting with the most seeds, among those measured with the options most of them used, with a ± std band (two or
    more seeds). Returns the paths written and notes on the runs left out."""
    written: list[Path] = []
    panels, notes = _measured_by_panel(runs, "slice1d", "slice")
    for (dataset, model), entries in panels:
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        for setting, label, results in entries:
            alphas = results[0]["alphas"]
            losses = np.array([result["losses"] for result in results])
            color = METHOD_COLORS.get(setting.optimizer, "black")
            mean = losses.mean(axis=0)
            axis.plot(alphas, mean, color=color, linewidth=1.8, label=f"{label}, n={len(results)}")
            if len(results) >= 2:
                std = losses.std(axis=0, ddof=1)
                axis.fill_between(alphas, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
        axis.set(xlabel="α: step along the direction, in units of each filter's own norm",
                 ylabel="loss on the measured training images (nats)",
                 title=f"{dataset}, {model}: loss along a filter-normalised random direction\n"
                       "(Li et al. 2018); mean over seeds, band ± 1 std")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        written += _save(figure, folder, f"slice1d_{_slug(dataset, model)}")
    return written, notes


def loss_surfaces(runs: pd.DataFrame, folder: Path) -> tuple[list[Path], list[str]]:
    """Per data set and model: the loss over the plane of two filter-normalised random directions
    (``scripts/sharpness.py --what slice2d``), one contour panel per method (its setting with the most seeds, the
    mean over the seeds measured with the options most of them used), on one colour scale with shared contour
    levels. Returns the paths written and notes on the runs left out."""
    written: list[Path] = []
    panels, notes = _measured_by_panel(runs, "slice2d", "surface")
    for (dataset, model), entries in panels:
        drawn = [(f"{label}, n={len(results)}", results[0]["alphas"], results[0]["betas"],
                  np.mean([result["losses"] for result in results], axis=0)) for _, label, results in entries]
        low = min(float(mean.min()) for *_, mean in drawn)
        high = max(float(mean.max()) for *_, mean in drawn)
        levels = np.linspace(low, high if high > low else low + 1e-9, 15)
        figure, axes = plt.subplots(1, len(drawn), figsize=(3.6 * len(drawn) + 1.4, 4.2), squeeze=False,
                                    sharey=True, layout="constrained")
        for axis, (label, alphas, betas, mean) in zip(axes[0], drawn):
            filled = axis.contourf(betas, alphas, mean, levels=levels, cmap="viridis")
            axis.contour(betas, alphas, mean, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
            axis.plot([0], [0], marker="+", color="red", markersize=10)
            axis.set(title=label, xlabel="β (second direction)")
        axes[0][0].set_ylabel("α (first direction)")
        figure.colorbar(filled, ax=list(axes[0]), label="loss on the measured training images (nats)")
        figure.suptitle(f"{dataset}, {model}: loss over two filter-normalised random directions\n(Li et al. 2018); "
                        "mean over seeds; + marks the final weights", fontsize=10)
        written += _save(figure, folder, f"slice2d_{_slug(dataset, model)}")
    return written, notes


def accuracy_against_lambda_max(runs: pd.DataFrame, folder: Path) -> tuple[list[Path], list[str]]:
    """Per data set and model: each finished run's final-epoch test top-1 against its λ_max (``scripts/sharpness.py
    --what eigen``), one point per run in its method's colour, among the runs measured with the options most of
    them used. Returns the paths written and notes on the runs left out."""
    written: list[Path] = []
    notes: list[str] = []
    if "lambda_max" not in runs:
        return written, notes
    measured = runs[(runs["status"] == "finished") & runs["lambda_max"].notna()]
    for (dataset, model), panel in measured.groupby(measured.apply(row_label, axis=1)):
        records = {row.run_dir: {"options": json.loads(row.lambda_max_options)} for row in panel.itertuples()}
        kept, left_out = _most_common_options(records, list(panel["run_dir"]))
        notes += [f"accuracy against λ_max: left out {run_dir} (λ_max measured with other options than the other "
                  "runs of its panel)" for run_dir in left_out]
        panel = panel[panel["run_dir"].isin(kept)]
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        for method, points in sorted(panel.groupby("optimizer"), key=lambda item: _method_key(item[0])):
            axis.scatter(points["lambda_max"], points["final_top1"], color=METHOD_COLORS.get(method, "black"),
                         label=f"{METHOD_NAMES.get(method, method)}, n={len(points)}", s=30)
        axis.set(xlabel="λ_max: top eigenvalue of the training loss's Hessian", ylabel=METRICS["final_top1"],
                 title=f"{dataset}, {model}: test accuracy against λ_max, one point per run\n"
                       "(sharpness is a diagnostic: it correlates weakly with accuracy across settings)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        written += _save(figure, folder, f"accuracy_vs_lambda_max_{_slug(dataset, model)}")
    return written, notes


def mean_chart(points: pd.DataFrame, title: str, value_label: str) -> plt.Figure:
    """One row per entry of ``points``, top to bottom in its order: the ``mean`` of ``label`` as a dot in the colour
    of ``method`` with an error bar of ± ``std`` (none for one seed), its numbers in the row's name
    (``label: mean ± std (n=…)``). Dots, not bars from zero: close methods differ by less than a bar drawn from zero
    can show, and the error bars must stay readable. For the wandb report (its own bar chart has no error bars);
    the caller closes the figure."""
    figure, axis = plt.subplots(figsize=(8, 0.4 * len(points) + 1.5))
    positions = np.arange(len(points))[::-1]
    names = []
    for position, label, method, mean, std, n in zip(positions, points["label"], points["method"], points["mean"],
                                                     points["std"], points["n"]):
        axis.errorbar(mean, position, xerr=0.0 if pd.isna(std) else std, fmt="o", capsize=3,
                      color=METHOD_COLORS.get(method, "black"))
        names.append(f"{label}: {mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}") + f" (n={int(n)})")
    axis.set_yticks(positions, names, fontsize=8)
    axis.set_xlabel(textwrap.fill(value_label, 50))  # centred under the axes: a long one would leave the figure
    axis.grid(axis="x", alpha=0.3)
    # over the whole figure, not the axes: the row names take the left part of it
    figure.suptitle(f"{title}\nmean over seeds, bars ± 1 sample standard deviation (n − 1)", fontsize=10)
    figure.tight_layout()
    return figure
