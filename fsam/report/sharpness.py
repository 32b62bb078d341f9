"""Sharpness in the reports: the numbers ``scripts/sharpness.py`` recorded in each run folder
(``analysis/sharpness.json``, see :mod:`fsam.analysis.record`) as table columns, averaged per setting only over runs
measured with identical options, and the caption that says how they were measured.

Metrics, one column each, in the loss's units (nats of cross-entropy):

* ``lambda_max``: the Hessian's largest eigenvalue (the first that power iteration found);
* ``hessian_trace``: its trace (Hutchinson's estimate);
* ``rho_worst_<geometry>_<ρ>`` and ``rho_average_<geometry>_<ρ>``: worst- and average-case ρ-sharpness, geometry
  ``plain`` (an L2 ball) or ``adaptive`` (scaled by |w|), at radius ρ.

This module reads JSON only: no torch, so a table script pays for none.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from fsam.runfolder import RunFolder, read_json

RHO_METRIC = re.compile(r"rho_(?P<case>worst|average)_(?P<geometry>plain|adaptive)_(?P<rho>[0-9.e+-]+)")
# Which record a metric comes from.
QUANTITY_OF = {"lambda_max": "eigen", "hessian_trace": "trace"}
PARTS = ("mean", "std", "n", "options", "left_out")
LABEL_TEXT = {"trained": "the labels the runs trained on", "clean": "their true labels"}


def read_measurements(run_dir: str | Path) -> dict[str, Any]:
    """The ``measurements`` of a run folder's sharpness record, or {} without a readable one."""
    return dict((read_json(RunFolder(run_dir).sharpness) or {}).get("measurements") or {})


def sharpness_columns(measurements: dict[str, Any]) -> dict[str, Any]:
    """One run's metrics as row columns: each metric's value, and beside it as ``<metric>_options`` the options it
    was measured with (canonical JSON), which decide what may be averaged with it."""
    columns: dict[str, Any] = {}

    def add(metric: str, value: float, options: dict[str, Any]) -> None:
        columns[metric] = value
        columns[f"{metric}_options"] = json.dumps(options, sort_keys=True)

    if "eigen" in measurements:
        add("lambda_max", measurements["eigen"]["result"]["eigenvalues"][0], measurements["eigen"]["options"])
    if "trace" in measurements:
        add("hessian_trace", measurements["trace"]["result"]["trace"], measurements["trace"]["options"])
    if "rho" in measurements:
        # Each radius is measured on its own (its own generator from the seed): the other radii asked for with it
        # do not change its numbers, so they are not among its options.
        options = {key: value for key, value in measurements["rho"]["options"].items()
                   if key not in ("rho", "adaptive_rho")}
        for geometry, entries in measurements["rho"]["result"].items():
            for entry in entries:
                for case in ("worst", "average"):
                    add(f"rho_{case}_{geometry}_{entry['rho']:g}", entry[f"{case}_case"], options)
    return columns


def sharpness_metrics(columns: Iterable[str]) -> list[str]:
    """The metrics among ``columns`` (bare, or with a ``_mean`` suffix): λ_max, the trace, then ρ-sharpness by
    geometry (plain first), radius and case (worst first)."""
    names = {column.removesuffix("_mean") for column in columns}
    found = [metric for metric in QUANTITY_OF if metric in names]
    rho = [(match["geometry"] != "plain", float(match["rho"]), match["case"] != "worst", name)
           for name in names if (match := RHO_METRIC.fullmatch(name))]
    return found + [name for *_, name in sorted(rho)]


def metric_title(metric: str) -> str:
    """The column title of a metric in the readable tables."""
    if metric == "lambda_max":
        return "λ_max (top Hessian eigenvalue)"
    if metric == "hessian_trace":
        return "Hessian trace (Hutchinson)"
    match = RHO_METRIC.fullmatch(metric)
    return f"{match['case']}-case ρ-sharpness ({match['geometry']}, ρ={match['rho']})"


def quantity_of(metric: str) -> str:
    return QUANTITY_OF.get(metric, "rho")


def summarise_sharpness(finished: pd.DataFrame, metrics: list[str]) -> dict[str, Any]:
    """For one setting's finished runs: per metric its mean, sample standard deviation (n − 1; NaN below two
    runs), n, the ``options`` averaged (canonical JSON) and how many runs were ``left_out`` for having been
    measured with other options. The options measured on the most runs are averaged (a tie: the first in sorted
    order): numbers measured differently are never mixed."""
    summary: dict[str, Any] = {}
    for metric in metrics:
        measured = finished[finished[metric].notna()] if metric in finished else finished.iloc[0:0]
        if measured.empty:
            summary.update({f"{metric}_mean": math.nan, f"{metric}_std": math.nan, f"{metric}_n": 0,
                            f"{metric}_options": None, f"{metric}_left_out": 0})
            continue
        counts = measured[f"{metric}_options"].value_counts()
        options = sorted(counts.index, key=lambda text: (-counts[text], text))[0]
        values = measured[measured[f"{metric}_options"] == options][metric].astype(float)
        summary.update({f"{metric}_mean": values.mean(), f"{metric}_std": values.std(ddof=1) if len(values) >= 2
                        else math.nan, f"{metric}_n": len(values), f"{metric}_options": options,
                        f"{metric}_left_out": len(measured) - len(values)})
    return summary


def format_sharpness(mean: float, std: float, n: int, left_out: int) -> str:
    """``201.6 ± 3.1 (n=2)``: four significant digits (these numbers span orders of magnitude), no ± for one run,
    ``—`` for none; runs measured with other options counted after n."""
    if n == 0:
        return "—" + (f" ({left_out} measured with other options)" if left_out else "")
    text = f"{mean:.4g}" + (f" ± {std:.2g}" if n >= 2 else "")
    return f"{text} (n={n}" + (f"; {left_out} measured with other options" if left_out else "") + ")"


def sharpness_caption(summary: pd.DataFrame) -> str:
    """How the sharpness columns of ``summary`` were measured and averaged, from the options of their cells."""
    metrics = sharpness_metrics(summary.columns)
    lines = ["Sharpness columns (scripts/sharpness.py; docs/sharpness.md): mean ± sample standard deviation over the "
             "finished runs of a setting measured with identical options (n is theirs; runs measured otherwise are "
             "counted, never averaged); ρ-sharpness in nats (a rise of the loss), λ_max and the trace in nats per "
             "squared unit of weight; the network in eval mode (BatchNorm with its running statistics), float32, "
             "the cross-entropy without weight decay. Diagnostics: sharpness correlates weakly with generalisation "
             "across settings (Andriushchenko et al., ICML 2023)."]
    by_quantity: dict[str, set[str]] = {}
    for metric in metrics:
        by_quantity.setdefault(quantity_of(metric), set()).update(summary[f"{metric}_options"].dropna())
    described = []  # (what a quantity computed, on which weights and images)
    for quantity, found in by_quantity.items():
        if len(found) == 1:
            options = json.loads(next(iter(found)))
            described.append((_described(quantity, options), _measured_on(options)))
        elif found:
            lines.append(f"{_NAMES[quantity]}: measured with {len(found)} different sets of options in different "
                         "settings; settings.csv gives each cell's (the <metric>_options columns).")
    if len({on for _, on in described}) == 1:
        lines += [what + "." for what, _ in described] + [f"All {described[0][1]}."]
    else:
        lines += [f"{what}, {on}." for what, on in described]
    return " ".join(lines)


_NAMES = {"eigen": "λ_max", "trace": "Hessian trace", "rho": "ρ-sharpness"}


def _measured_on(options: dict[str, Any]) -> str:
    return (f"on the {options['checkpoint']} weights and {options['images']} training images (image seed "
            f"{options['image_seed']}) with {LABEL_TEXT[options['labels']]}, in batches of {options['batch_size']}")


def _described(quantity: str, options: dict[str, Any]) -> str:
    """What ``quantity`` computed with ``options``, as a sentence without its full stop."""
    if quantity == "eigen":
        return (f"λ_max: the largest Hessian eigenvalue by power iteration (at most {options['power_iterations']} "
                f"Hessian-vector products, stopping at a relative change below {options['power_tolerance']:g})")
    if quantity == "trace":
        return f"Hessian trace: Hutchinson's estimate over {options['trace_probes']} Rademacher probes"
    return (f"ρ-sharpness: the loss increase within an L2 ball of radius ρ (plain) or that ball scaled by |w| "
            f"(adaptive), per batch of m = {options['batch_size']} images and averaged over the batches; worst case "
            f"by {options['ascent_steps']} projected gradient-ascent steps from the best of "
            f"{options['random_directions']} random directions on the sphere of radius ρ, average case over those "
            "directions")
