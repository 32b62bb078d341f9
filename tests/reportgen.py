"""Run folders written without training, and the report scripts run in-process, for the tests of fsam.report.

``write_run`` writes a folder in the engine's format (config.yaml with the identity, metrics.jsonl and, by
``state``, summary.json or status.json) from values chosen so that tables and figures can be worked out by hand;
``write_sharpness`` adds the record ``scripts/sharpness.py`` writes (``analysis/sharpness.json``).
``run_script`` calls a script's ``main()`` in this process with ``sys.argv`` set, so that coverage tools (mutmut)
see which functions it runs and no interpreter is started.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

from fsam.config import load_config, to_plain
from fsam.runfolder import RunFolder, identity_record

REPO = Path(__file__).resolve().parents[1]


def write_run(root: Path, name: str, *, method: str = "sgd", lr: float = 0.1, seed: int = 1,
              top1: list[float] | None = None, state: str = "finished", model: str = "resnet18",
              noise: float = 0.0, lmbda: float = 0.6, sigma: float = 1.0, loss: list[float] | None = None,
              dataset: str = "cifar10", noise_kind: str = "symmetric", optimizer: dict[str, Any] | None = None,
              model_kwargs: dict[str, Any] | None = None, analysis: list[list[dict[str, Any]]] | None = None,
              summary: dict[str, Any] | None = None) -> Path:
    """A run folder in the engine's format, written without training: ``top1`` is the test top-1 of each epoch,
    ``loss`` the training loss (default 2 / epoch), ``analysis`` the EMA measurements of each epoch.
    ``state``: finished (summary.json), diverged (status.json), unfinished (neither). ``optimizer`` adds keys to
    the optimizer's config (rho, perturbation, base, ...), ``summary`` to summary.json."""
    top1 = top1 or [50.0, 60.0]
    loss = loss or [2.0 / epoch for epoch in range(1, len(top1) + 1)]
    config = load_config({
        "run_dir": str(root / name),
        "model": {"name": model, "kwargs": model_kwargs or {}},
        "dataset": {"name": dataset, "noise": {"kind": noise_kind if noise else "none", "ratio": noise}},
        "optimizer": {"name": method, "lr": lr, "lmbda": lmbda, "sigma": sigma, **(optimizer or {})},
        "trainer": {"epochs": len(top1), "seed": seed},
    })
    folder = RunFolder(config.run_dir)
    folder.path.mkdir(parents=True)
    identity = identity_record(config, 1, {"name": model, "kwargs": model_kwargs or {}, "parameters": 11_173_962,
                                           "label": model})
    folder.write_config(identity, to_plain(config))
    rows = [{"epoch": epoch, "step": 10 * epoch, "test_top1": value, "train_loss": loss[epoch - 1]}
            for epoch, value in enumerate(top1, start=1)]
    for row, measured in zip(rows, analysis or []):
        row["analysis"] = measured
    folder.rewrite_metrics(rows)
    if state == "finished":
        best = max(top1)
        folder.write_summary({"status": "finished", "best_top1": best, "best_epoch": top1.index(best) + 1,
                              "final_top1": top1[-1], "seed": seed, "method": method, "setting": identity["setting"],
                              "model": identity["model"], **(summary or {})}, epochs=len(top1))
    elif state == "diverged":
        folder.write_status({"status": "diverged", "message": "training diverged: test"})
    return folder.path


def run_script(monkeypatch, name: str, *arguments: Any) -> int:
    """``python scripts/<name>.py ARGUMENTS`` in this process: the script's ``main()`` with ``sys.argv`` set;
    returns its exit status (read what it printed with capsys)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *(str(argument) for argument in arguments)])
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"))["main"]()


SHARPNESS_OPTIONS = {"checkpoint": "final", "images": 128, "image_seed": 0, "labels": "trained", "batch_size": 64,
                     "seed": 0}


def write_sharpness(run_dir: Path, *, lambda_max: float | None = None, trace: float | None = None,
                    rho: dict[str, list[tuple[float, float, float]]] | None = None,
                    slice_losses: list[float] | None = None, alphas: list[float] | None = None,
                    **options: Any) -> Path:
    """``analysis/sharpness.json`` in the format of :mod:`fsam.analysis.record` with the numbers given: λ_max,
    the trace, ``rho`` as ``{geometry: [(ρ, worst, average), ...]}``, a 1-D slice (``slice_losses`` at ``alphas``,
    default -1 to 1); ``options`` replace the common options (images, labels, ...) of every quantity."""
    common = {**SHARPNESS_OPTIONS, **options}
    measurements: dict[str, Any] = {}
    if lambda_max is not None:
        measurements["eigen"] = {"options": {**common, "top_k": 1, "power_iterations": 20, "power_tolerance": 0.001},
                                 "result": {"eigenvalues": [lambda_max, lambda_max / 2]}}
    if trace is not None:
        measurements["trace"] = {"options": {**common, "trace_probes": 10},
                                 "result": {"trace": trace, "standard_error": 1.0}}
    if rho is not None:
        radii = {geometry: [radius for radius, *_ in entries] for geometry, entries in rho.items()}
        measurements["rho"] = {
            "options": {**common, "rho": radii.get("plain", []), "adaptive_rho": radii.get("adaptive", []),
                        "ascent_steps": 10, "random_directions": 10},
            "result": {geometry: [{"rho": radius, "worst_case": worst, "average_case": average}
                                  for radius, worst, average in entries] for geometry, entries in rho.items()}}
    if slice_losses is not None:
        alphas = alphas or [-1.0 + 2.0 * index / (len(slice_losses) - 1) for index in range(len(slice_losses))]
        measurements["slice1d"] = {"options": {**common, "slice_radius": 1.0, "slice_points": len(alphas)},
                                   "result": {"alphas": alphas, "losses": slice_losses}}
    path = Path(run_dir) / "analysis" / "sharpness.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"format": 1, "measurements": measurements}))
    return path
