"""A whole study at tiny size, trained for real: tuning trials, the choice, seeds, the heatmap, then the report
(fsam/report/comparison.py) with its tables, differences and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fsam.config.compose import compose_runs
from fsam.engine import run
from fsam.errors import FsamError
from fsam.report.comparison import collect, comparison_tables, report_text, results_layout, write_report
from fsam.study import Dimension, Study, heatmap_cells, seed_blocks

TINY = Study(
    name="tiny", base=("experiment=digits_noise", "trainer.epochs=2", "trainer.device=cpu",
                       "trainer.full_grad_analysis_every=8"),
    conditions={"sym40": ("dataset.noise.kind=symmetric", "dataset.noise.ratio=0.4")},
    search={"sgd": (Dimension("optimizer.lr", 0.05, 0.2),),
            "fsam": (Dimension("optimizer.lr", 0.05, 0.2), Dimension("optimizer.rho", 0.05, 0.5))},
    trials=2, trial_seed=3, seeds=2, select="final_val_top1", heatmap_condition="sym40",
    heatmap={"optimizer.lmbda": (0.0, 0.6), "optimizer.sigma": (1.0,)}, heatmap_seeds=1,
    sharpness=("--what", "eigen", "--images", "32", "--batch-size", "32", "--power-iterations", "3"),
)


def train(cells: list[list[str]]) -> None:
    for _, config in compose_runs(cells):
        run(config)


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory) -> Path:
    """The tiny study's runs: tuning, seeds and heatmap (module-scoped: trained once)."""
    import os

    root = tmp_path_factory.mktemp("study") / "runs"
    before = os.environ.get("FSAM_RUNS")
    os.environ["FSAM_RUNS"] = str(root)
    try:
        train([[*overrides, "trainer.seed=1"] for _, _, overrides in TINY.tuning_cells()])
        train([[*block, f"trainer.seed={seed}"] for block in seed_blocks(TINY, compose_runs) for seed in (1, 2)])
        train([[*cell, "trainer.seed=1"] for cell in heatmap_cells(TINY, compose_runs)])
        from fsam.analysis.record import Options, measure_run

        for folder, _ in compose_runs([[*block, "trainer.seed=1"] for block in seed_blocks(TINY, compose_runs)]):
            measure_run(folder, Options(what=("eigen",), images=32, batch_size=32, power_iterations=3), progress=False)
    finally:
        os.environ.pop("FSAM_RUNS") if before is None else os.environ.__setitem__("FSAM_RUNS", before)
    return root


def test_the_report_holds_every_seed_its_differences_and_the_heatmap(study_runs, monkeypatch, tmp_path):
    monkeypatch.setenv("FSAM_RUNS", str(study_runs))
    collected = collect(TINY, compose_runs)
    assert collected.missing == []
    assert {key: [run.seed for run in runs] for key, runs in collected.seeds.items()} == {
        ("sym40", "sgd"): [1, 2], ("sym40", "fsam"): [1, 2]}
    tables = comparison_tables(collected)
    results = tables["results"].set_index(["method", "value"])
    for method in ("sgd", "fsam"):
        finals = [run.summary["final_top1"] for run in collected.seeds[("sym40", method)]]
        assert results.loc[(method, "final_top1"), "mean"] == pytest.approx(sum(finals) / 2)
        assert results.loc[(method, "final_top1"), "n"] == 2
        assert results.loc[(method, "train_fit_top1"), "n"] == 2  # the noisy-label fit is reported
    assert ("fsam", "ema_cosine_mean") in results.index and ("sgd", "ema_cosine_mean") not in results.index
    for method in ("sgd", "fsam"):  # measured on seed 1 only: one value, never averaged with an unmeasured seed
        measured = collected.seeds[("sym40", method)][0].sharpness["measurements"]["eigen"]["result"]["eigenvalues"]
        assert results.loc[(method, "sharpness.lambda_max"), "mean"] == measured[0]
        assert results.loc[(method, "sharpness.lambda_max"), "n"] == 1
    (difference,) = tables["differences"].itertuples()
    fsam = {run.seed: run.summary["final_top1"] for run in collected.seeds[("sym40", "fsam")]}
    sgd = {run.seed: run.summary["final_top1"] for run in collected.seeds[("sym40", "sgd")]}
    assert difference.pair == "fsam - sgd" and difference.n == 2
    assert difference.mean == pytest.approx(sum(fsam[seed] - sgd[seed] for seed in (1, 2)) / 2)
    assert list(tables["heatmap"]["lmbda"]) == [0.0, 0.6] and list(tables["heatmap"]["n"]) == [1, 1]
    text = report_text(collected, tables)
    assert "## Final-epoch test top-1 (%): the headline" in text and "never the test split" in text
    assert "## Sharpness (diagnostic): λ_max (top Hessian eigenvalue)" in text
    assert list(results_layout(tables["results"], "final_top1").columns) == ["sgd", "fsam"]
    written = write_report(collected, tmp_path)
    names = {path.name for path in written}
    assert {"results.csv", "differences.csv", "chosen.csv", "heatmap.csv", "comparison.md", "curves.png"} <= names
    assert any(name.startswith("heatmap_lambda_sigma") for name in names)
    assert pd.read_csv(tmp_path / "tables" / "results.csv")["mean"].dtype == float  # numbers as numbers


def test_a_damaged_seed_is_named_and_left_out(study_runs, monkeypatch, tmp_path):
    monkeypatch.setenv("FSAM_RUNS", str(study_runs))
    collected = collect(TINY, compose_runs)
    victim = next(path for path in study_runs.rglob("summary.json") if "-sgd-" in str(path) and "seed2" in str(path))
    saved = victim.read_text()
    try:
        victim.write_text("{ cut")
        damaged = collect(TINY, compose_runs)
    finally:
        victim.write_text(saved)
    assert [run.seed for run in damaged.seeds[("sym40", "sgd")]] == [1]
    (line,) = damaged.missing
    assert line.startswith(str(victim.parent)) and "summary.json" in line
    assert len(collected.seeds[("sym40", "sgd")]) == 2


def test_the_report_refuses_a_study_whose_tuning_has_not_run(monkeypatch, tmp_path):
    monkeypatch.setenv("FSAM_RUNS", str(tmp_path / "empty"))
    with pytest.raises(FsamError, match="4 of 4 tuning runs of tiny are not finished"):
        collect(TINY, compose_runs)


def test_the_analysis_stage_measures_the_seed_stages_runs_and_says_which_are_measured(study_runs, monkeypatch,
                                                                                         tmp_path, capsys):
    """scripts/reproduce.py --grid <study>_sharpness: seed 1 was measured with the stage's options (read back),
    seed 2 not yet; one command measures what is missing, in two processes here."""
    import argparse
    import runpy
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(study_runs, runs)
    monkeypatch.setenv("FSAM_RUNS", str(runs))
    reproduce = runpy.run_path(str(Path(__file__).parent.parent / "scripts" / "reproduce.py"))
    blocks = seed_blocks(TINY, compose_runs)
    arguments = argparse.Namespace(launcher="inprocess", parallel=2, extra=[], dry_run=False, status=True)
    assert reproduce["measure_grid"](TINY, blocks, "1,2", arguments) == 0
    status = capsys.readouterr().out
    assert "runs: 2 measured, 2 to measure" in status
    assert all(("seed1" in line) == line.startswith("measured") for line in status.splitlines() if "seed" in line)
    arguments.status = False
    assert reproduce["measure_grid"](TINY, blocks, "1,2", arguments) == 0
    arguments.status = True
    assert reproduce["measure_grid"](TINY, blocks, "1,2", arguments) == 0
    assert "runs: 4 measured" in capsys.readouterr().out
    for folder, _ in compose_runs(grid_cells(blocks)):
        record = json.loads((folder / "analysis" / "sharpness.json").read_text())
        assert record["measurements"]["eigen"]["options"]["images"] == 32


def grid_cells(blocks: list[list[str]]) -> list[list[str]]:
    return [[*block, f"trainer.seed={seed}"] for block in blocks for seed in (1, 2)]
