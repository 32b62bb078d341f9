"""The report package's contract, in-process and with every expected value worked out by hand: what each figure
draws (points, bands, labels, colours, titles, file names), the exact text of the tables (Markdown cells, LaTeX),
the refusals, and what the wandb uploads record. Written against the survivors of mutation testing
(``python scripts/mutation.py fsam/report``): each test states a behaviour a planted bug broke unnoticed.

Figures are kept as matplotlib objects (``drawn``) and read back: a line's points are ``line.get_xydata()``, a
band's edges the lowest and highest vertex of its polygon at each epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_rgba
from matplotlib.ticker import MaxNLocator

import fsam.report.figures as figures
from fsam.errors import FsamError
from fsam.report import load_runs
from fsam.report.runs import damaged, runs_under
from fsam.report.sharpness import format_sharpness, sharpness_caption, sharpness_metrics
from fsam.report.tables import (
    format_cell, layout_caption, load_known, paper_layout, published_value, reference_table, reported_metrics, row_label,
    setting_labels, settings_caption, settings_table, summarise, to_latex, _latex_cell, _latex_escape,
)
from fsam.report.wandb_upload import MeanChart, _plain, backfill, log_tables
from fsam.runfolder import RunFolder
from reportgen import run_script, write_run, write_sharpness
from wandb_records import read_run

SGD, SAM, FSAM = "#7f7f7f", "#1f77b4", "#d62728"  # METHOD_COLORS, written out: a method looks the same everywhere
BEST, FINAL, AT_VAL = ("test top-1 at the best test epoch (%; diagnostic: chosen on the test set)",
                       "final-epoch test top-1 (%)", "test top-1 at the best validation epoch (%)")


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Drawn:
    figure: plt.Figure
    folder: Path
    stem: str


@pytest.fixture
def drawn(monkeypatch):
    """Every figure handed to ``_save``, kept for reading instead of written; ``_save`` returns the paths it would
    have written (``_save`` itself is tested on its own below)."""
    kept: list[Drawn] = []

    def keep(figure, folder, stem):
        kept.append(Drawn(figure, folder, stem))
        plt.close(figure)
        return [folder / f"{stem}.png", folder / f"{stem}.pdf"]

    monkeypatch.setattr(figures, "_save", keep)
    return kept


def points(line) -> list[tuple[float, float]]:
    return [(float(x), round(float(y), 6)) for x, y in line.get_xydata()]


def band(collection) -> dict[float, tuple[float, float]]:
    """A fill_between band as ``{x: (lowest y, highest y)}`` over its polygon's vertices."""
    edges: dict[float, list[float]] = {}
    for x, y in collection.get_paths()[0].vertices:
        edges.setdefault(float(x), []).append(float(y))
    return {x: (round(min(ys), 6), round(max(ys), 6)) for x, ys in sorted(edges.items())}


def legend(axis) -> list[str]:
    return [text.get_text() for text in axis.get_legend().get_texts()]


SUMMARY_DEFAULTS = {
    "setting": "s", "dataset": "cifar10", "noise": "none", "noise_ratio": None, "model": "resnet18",
    "optimizer": "fsam", "base": "sgd", "lr": 0.1, "weight_decay": 0.0005, "rho": 0.2, "sigma": 1.0, "lmbda": 0.6,
    "epochs": 200, "batch_size": 128, "n": 1, "unfinished": 0, "running": 0, "diverged": 0, "short": False,
    "best_top1_mean": math.nan, "best_top1_std": math.nan, "final_top1_mean": math.nan, "final_top1_std": math.nan,
    "test_top1_at_best_val_mean": math.nan, "test_top1_at_best_val_std": math.nan,
}
NOT_READ_BY_SGD = {"rho": None, "sigma": None, "lmbda": None}


def summary_of(*rows: dict) -> pd.DataFrame:
    """A frame in :func:`summarise`'s format, one row per dict (each overriding SUMMARY_DEFAULTS), in this order."""
    return pd.DataFrame([{**SUMMARY_DEFAULTS, **row} for row in rows], columns=list(SUMMARY_DEFAULTS))


def png_size_and_dpi(path: Path) -> tuple[int, int, float]:
    data = path.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    at = data.index(b"pHYs") + 4
    return width, height, int.from_bytes(data[at:at + 4], "big") * 0.0254  # pixels per metre -> per inch


# ------------------------------------------------------------------------------------------------ figures: _save


def test_save_writes_a_png_and_a_pdf_at_150_dpi_and_closes_only_its_figure(tmp_path):
    figure, axis = plt.subplots(figsize=(2, 1))
    axis.plot([1, 2], [3, 4])
    other = plt.figure()  # the current figure; it must stay open
    folder = tmp_path / "new" / "nested"
    paths = figures._save(figure, folder, "curves_x")
    assert paths == [folder / "curves_x.png", folder / "curves_x.pdf"]
    assert sorted(path.name for path in folder.iterdir()) == ["curves_x.pdf", "curves_x.png"]  # no temporary left
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert round(png_size_and_dpi(paths[0])[2]) == 150
    assert not plt.fignum_exists(figure.number) and plt.fignum_exists(other.number)
    plt.close(other)


def test_save_keeps_whatever_is_drawn_outside_the_axes_in_the_picture(tmp_path):
    figure = plt.figure(figsize=(2, 1))
    figure.text(1.6, 0.5, "a label past the right edge")
    (png, _) = figures._save(figure, tmp_path, "wide")
    width, _, dpi = png_size_and_dpi(png)
    assert width > 2 * dpi  # the tight box grew to hold the label instead of cutting it at 2 inches


def test_save_replaces_an_old_figure_whole_and_leaves_it_when_drawing_fails(tmp_path, monkeypatch):
    for suffix in ("png", "pdf"):
        (tmp_path / f"f.{suffix}").write_bytes(b"old")
    figure, axis = plt.subplots()
    figures._save(figure, tmp_path, "f")  # the folder exists already: fine
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"

    (tmp_path / "f.pdf").write_bytes(b"old")
    broken, _ = plt.subplots()
    real = broken.savefig

    def fail_on_pdf(path, **kwargs):
        if str(path).endswith(".pdf"):
            Path(path).write_bytes(b"%PDF-half")
            raise OSError("disk full")
        return real(path, **kwargs)

    monkeypatch.setattr(broken, "savefig", fail_on_pdf)
    with pytest.raises(OSError):
        figures._save(broken, tmp_path, "f")
    assert (tmp_path / "f.pdf").read_bytes() == b"old"  # never half a figure under the real name
    plt.close(broken)


@pytest.mark.parametrize(("parts", "slug"), [
    (("digits (symmetric 20% noise)", "pyramidnet8"), "digits-symmetric-20-noise_pyramidnet8"),
    (("CIFAR-10", "wrn28_10"), "CIFAR-10_wrn28-10"),
    (("cifar10-resnet18-fsam-0123abcd", "seed3"), "cifar10-resnet18-fsam-0123abcd_seed3"),
    (("  a//b  ", 7), "a-b_7"),
])
def test_file_names_keep_letters_and_digits_joined_by_dashes_and_parts_by_underscores(parts, slug):
    assert figures._slug(*parts) == slug


# ------------------------------------------------------------------------------------------------ learning curves


@pytest.fixture
def one_panel(tmp_path):
    """SGD with two seeds, F-SAM with one, SAM only unfinished; CIFAR-10 / resnet18."""
    root = tmp_path / "runs"
    write_run(root, "sgd/seed1", seed=1, top1=[50.0, 60.0], loss=[2.0, 1.0])
    write_run(root, "sgd/seed2", seed=2, top1=[54.0, 70.0], loss=[1.0, 0.5])
    write_run(root, "fsam/seed1", method="fsam", top1=[55.0, 65.0], loss=[1.5, 0.9])
    write_run(root, "sam/seed1", method="sam", top1=[40.0, 45.0], state="unfinished")
    return load_runs(root)


def test_learning_curves_are_the_mean_over_seeds_with_a_band_of_one_std(one_panel, drawn, tmp_path):
    written, notes = figures.learning_curves(one_panel, tmp_path / "figures")
    assert notes == []
    (figure,) = drawn
    assert figure.stem == "curves_CIFAR-10_resnet18" and figure.folder == tmp_path / "figures"
    assert written == [tmp_path / "figures" / "curves_CIFAR-10_resnet18.png",
                       tmp_path / "figures" / "curves_CIFAR-10_resnet18.pdf"]
    accuracy, loss = figure.figure.axes
    # in method order (SGD, SAM, ..., F-SAM), each in its method's colour
    assert [points(line) for line in accuracy.lines] == [[(1, 52.0), (2, 65.0)], [(1, 40.0), (2, 45.0)],
                                                         [(1, 55.0), (2, 65.0)]]
    assert [points(line) for line in loss.lines] == [[(1, 1.5), (2, 0.75)], [(1, 2.0), (2, 1.0)],
                                                     [(1, 1.5), (2, 0.9)]]
    for axis in (accuracy, loss):
        assert [line.get_color() for line in axis.lines] == [SGD, SAM, FSAM]
        assert [line.get_linestyle() for line in axis.lines] == ["-", "-", "-"]  # one setting each: solid
        assert [line.get_label() for line in axis.lines] == ["SGD, n=2", "SAM, n=1 (unfinished)", "F-SAM, n=1"]
        assert legend(axis) == ["SGD, n=2", "SAM, n=1 (unfinished)", "F-SAM, n=1"]
        (sgd_band,) = axis.collections  # only SGD has two seeds: one band
        assert tuple(sgd_band.get_facecolor()[0]) == pytest.approx(to_rgba(SGD, 0.18))
        assert list(sgd_band.get_linewidth()) == [0]
        assert isinstance(axis.xaxis.get_major_locator(), MaxNLocator)
        assert all(float(tick).is_integer() for tick in axis.get_xticks())  # epochs are whole numbers
        assert axis.get_xlabel() == "epoch"
    # seeds 50, 54 and 60, 70: std sqrt(8) and sqrt(50); losses 2, 1 and 1, 0.5: std sqrt(0.5) and sqrt(0.125)
    assert band(accuracy.collections[0]) == {1.0: (round(52 - 8 ** 0.5, 6), round(52 + 8 ** 0.5, 6)),
                                             2.0: (round(65 - 50 ** 0.5, 6), round(65 + 50 ** 0.5, 6))}
    assert band(loss.collections[0]) == {1.0: (round(1.5 - 0.5 ** 0.5, 6), round(1.5 + 0.5 ** 0.5, 6)),
                                         2.0: (round(0.75 - 0.125 ** 0.5, 6), round(0.75 + 0.125 ** 0.5, 6))}
    assert (accuracy.get_title(), accuracy.get_ylabel()) == ("Test accuracy", "test top-1 accuracy (%)")
    assert (loss.get_title(), loss.get_ylabel()) == ("Training loss", "training loss (cross-entropy, nats)")
    assert figure.figure.get_suptitle() == "CIFAR-10, resnet18: mean over seeds, band ± 1 std"


def test_learning_curves_average_only_the_finished_seeds_of_a_setting_that_has_some(tmp_path, drawn):
    root = tmp_path / "runs"
    write_run(root, "fsam/seed1", method="fsam", seed=1, top1=[60.0, 70.0])
    write_run(root, "fsam/seed2", method="fsam", seed=2, top1=[10.0, 20.0], state="unfinished")
    write_run(root, "fsam/seed3", method="fsam", seed=3, top1=[30.0, 30.0], state="diverged")
    figures.learning_curves(load_runs(root), tmp_path)
    (line,) = drawn[0].figure.axes[0].lines
    assert points(line) == [(1, 60.0), (2, 70.0)] and line.get_label() == "F-SAM, n=1"


def test_a_setting_without_epoch_records_is_left_out_and_the_others_still_drawn(tmp_path, drawn):
    root = tmp_path / "runs"
    empty = write_run(root, "sgd/seed1", state="unfinished")  # SGD and SAM come first in the method order
    (empty / "metrics.jsonl").write_text("")
    per_step = write_run(root, "sam/seed1", method="sam", state="unfinished")
    (per_step / "metrics.jsonl").write_text('{"step": 5, "test_top1": 10.0, "train_loss": 1.0}\n')  # no epoch
    write_run(root, "fsam/seed1", method="fsam", top1=[70.0, 80.0])
    figures.learning_curves(load_runs(root), tmp_path)
    accuracy = drawn[0].figure.axes[0]
    assert [line.get_label() for line in accuracy.lines] == ["F-SAM, n=1"]


def test_a_method_without_a_colour_or_a_name_is_drawn_last_in_black_under_its_own_name(one_panel, drawn, tmp_path):
    figures.learning_curves(one_panel.replace({"optimizer": {"fsam": "newmethod"}}), tmp_path)
    accuracy = drawn[0].figure.axes[0]
    assert [(line.get_label(), line.get_color()) for line in accuracy.lines] == [
        ("SGD, n=2", SGD), ("SAM, n=1 (unfinished)", SAM), ("newmethod, n=1", "black")]


def test_learning_curves_of_nothing_draw_nothing(tmp_path, drawn):
    runs = pd.DataFrame({"setting": [None], "status": ["unfinished"], "run_dir": [str(tmp_path)]})
    assert figures.learning_curves(runs, tmp_path) == ([], [])
    assert drawn == []


def test_each_data_set_and_model_gets_its_own_panel(tmp_path, drawn):
    root = tmp_path / "runs"
    write_run(root, "clean/seed1", top1=[80.0, 90.0])
    write_run(root, "noisy/seed1", noise=0.2, top1=[60.0, 70.0])
    write_run(root, "wrn/seed1", model="wrn28_10", top1=[85.0, 95.0])
    written, _ = figures.learning_curves(load_runs(root), tmp_path)
    assert [d.stem for d in drawn] == ["curves_CIFAR-10_resnet18", "curves_CIFAR-10_wrn28-10",
                                       "curves_CIFAR-10-symmetric-20-noise_resnet18"]
    assert written == [tmp_path / f"{d.stem}.{suffix}" for d in drawn for suffix in ("png", "pdf")]
    assert [points(d.figure.axes[0].lines[0]) for d in drawn] == [[(1, 80.0), (2, 90.0)], [(1, 85.0), (2, 95.0)],
                                                                  [(1, 60.0), (2, 70.0)]]
    assert drawn[2].figure.get_suptitle().startswith("CIFAR-10 (symmetric 20% noise), resnet18: ")


@pytest.fixture
def fsam_sweep(tmp_path):
    """F-SAM at λ 0.3 (two finished seeds) and λ 0.9 (one finished, one unfinished); SGD at one setting."""
    root = tmp_path / "runs"
    write_run(root, "fsam-0.3/seed1", method="fsam", lmbda=0.3, seed=1, top1=[60.0, 70.0])
    write_run(root, "fsam-0.3/seed2", method="fsam", lmbda=0.3, seed=2, top1=[62.0, 72.0])
    write_run(root, "fsam-0.9/seed1", method="fsam", lmbda=0.9, seed=1, top1=[50.0, 52.0])
    write_run(root, "fsam-0.9/seed2", method="fsam", lmbda=0.9, seed=2, top1=[10.0, 12.0], state="unfinished")
    write_run(root, "sgd/seed1", top1=[40.0, 45.0])
    return load_runs(root)


def setting_of(runs: pd.DataFrame, **values) -> str:
    match = runs
    for key, value in values.items():
        match = match[match[key] == value]
    (setting,) = set(match["setting"])
    return setting


def test_by_default_each_method_shows_its_setting_with_the_most_finished_seeds_and_names_the_rest(fsam_sweep,
                                                                                                  drawn, tmp_path):
    _, notes = figures.learning_curves(fsam_sweep, tmp_path)
    left_out = setting_of(fsam_sweep, optimizer="fsam", lmbda=0.9)
    assert notes == [f"curves: left out {left_out} (another setting of its method has more seeds; --all-settings "
                     "draws it)"]
    accuracy = drawn[0].figure.axes[0]
    assert [(line.get_label(), points(line)) for line in accuracy.lines] == [
        ("SGD, n=1", [(1, 40.0), (2, 45.0)]), ("F-SAM, n=2", [(1, 61.0), (2, 71.0)])]


def test_all_settings_draws_every_setting_named_by_what_differs_in_one_line_style_each(fsam_sweep, drawn, tmp_path):
    written, notes = figures.learning_curves(fsam_sweep, tmp_path, all_settings=True)
    assert notes == [] and len(written) == 2
    for axis in drawn[0].figure.axes:
        assert [line.get_label() for line in axis.lines] == ["SGD, n=1", "F-SAM (λ 0.3), n=2", "F-SAM (λ 0.9), n=1"]
        assert [line.get_linestyle() for line in axis.lines] == ["-", "-", "--"]  # styles count within a method
        assert [line.get_color() for line in axis.lines] == [SGD, FSAM, FSAM]
    assert points(drawn[0].figure.axes[0].lines[2]) == [(1, 50.0), (2, 52.0)]  # the finished seed only


def dash_pattern(line) -> tuple:
    return line.get_linestyle(), line._unscaled_dash_pattern  # named styles, then the dash lengths themselves


def test_all_settings_gives_up_to_six_settings_of_a_method_six_different_line_styles(tmp_path, drawn):
    root = tmp_path / "runs"
    lambdas = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    for lmbda in lambdas:
        write_run(root, f"fsam-{lmbda}/seed1", method="fsam", lmbda=lmbda, top1=[50.0, 50.0 + 10 * lmbda])
    figures.learning_curves(load_runs(root), tmp_path, all_settings=True)
    lines = drawn[0].figure.axes[0].lines
    assert [line.get_label() for line in lines] == [f"F-SAM (λ {lmbda:g}), n=1" for lmbda in lambdas]
    assert [line.get_linestyle() for line in lines[:4]] == ["-", "--", ":", "-."]
    assert len({dash_pattern(line) for line in lines[:6]}) == 6
    assert dash_pattern(lines[6]) == dash_pattern(lines[0])  # the seventh starts the styles again
    assert points(lines[4]) == [(1, 50.0), (2, 55.0)]


def test_one_setting_per_method_counts_only_finished_seeds_then_takes_the_first_name(tmp_path):
    root = tmp_path / "runs"
    # SGD: one finished seed at lr 0.1; two runs at lr 0.05 that never finished; whichever name sorts first,
    # the finished one is kept
    write_run(root, "sgd-a/seed1", lr=0.1)
    write_run(root, "sgd-b/seed1", lr=0.05, seed=1, state="unfinished")
    write_run(root, "sgd-b/seed2", lr=0.05, seed=2, state="diverged")
    # F-SAM: one finished seed at each of two settings: the first by name is kept
    write_run(root, "fsam-a/seed1", method="fsam", lmbda=0.3)
    write_run(root, "fsam-b/seed1", method="fsam", lmbda=0.9)
    runs = load_runs(root)
    kept, notes = figures.one_setting_per_method(runs)
    finished_sgd = setting_of(runs, optimizer="sgd", lr=0.1)
    unfinished_sgd = setting_of(runs, optimizer="sgd", lr=0.05)
    fsam_settings = sorted(set(runs[runs["optimizer"] == "fsam"]["setting"]))
    assert set(kept["setting"]) == {finished_sgd, fsam_settings[0]}
    first_fsam = {setting_of(runs, optimizer="fsam", lmbda=0.3): root / "fsam-a" / "seed1",
                  setting_of(runs, optimizer="fsam", lmbda=0.9): root / "fsam-b" / "seed1"}[fsam_settings[0]]
    assert sorted(kept["run_dir"]) == sorted([str(root / "sgd-a" / "seed1"), str(first_fsam)])
    assert sorted(notes) == sorted(
        f"curves: left out {setting} (another setting of its method has more seeds; --all-settings draws it)"
        for setting in (unfinished_sgd, fsam_settings[1]))


def test_labels_name_only_what_differs_between_settings_of_a_method():
    settings = pd.DataFrame([
        {"setting": "f1", "optimizer": "fsam", "lr": 0.1, "weight_decay": 5e-4, "rho": 0.2, "sigma": 1.0,
         "lmbda": 0.3, "epochs": 200, "batch_size": 128, "base": "sgd"},
        {"setting": "f2", "optimizer": "fsam", "lr": 0.1, "weight_decay": 5e-4, "rho": 0.2, "sigma": 0.5,
         "lmbda": 0.9, "epochs": 100, "batch_size": 128, "base": "adamw"},
        {"setting": "s1", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "rho": None, "sigma": None,
         "lmbda": None, "epochs": 200, "batch_size": 128, "base": "sgd"},
        {"setting": "x1", "optimizer": "lookahead", "lr": 0.1, "weight_decay": 5e-4, "rho": None, "sigma": None,
         "lmbda": None, "epochs": 200, "batch_size": 128, "base": "sgd"},
    ])
    assert setting_labels(settings) == {
        "f1": "F-SAM (σ 1, λ 0.3, epochs 200, base sgd)",  # numbers written short (:g), names as they are
        "f2": "F-SAM (σ 0.5, λ 0.9, epochs 100, base adamw)",
        "s1": "SGD",
        "x1": "lookahead",  # a method without a display name keeps its own
    }


def test_settings_that_differ_only_in_what_labels_leave_out_are_told_apart_by_their_digest():
    alike = {"optimizer": "fsam", "lr": 0.1, "weight_decay": 5e-4, "rho": 0.2, "sigma": 1.0, "lmbda": 0.6,
             "epochs": 200, "batch_size": 128, "base": "sgd"}  # they differ in, say, the augmentation
    settings = pd.DataFrame([{"setting": "cifar10-resnet18-fsam-0123456789ab", **alike},
                             {"setting": "cifar10-resnet18-fsam-ba9876543210", **alike},
                             {"setting": "cifar10-resnet18-fsam-ffffffffffff", **alike, "lmbda": 0.9}])
    assert setting_labels(settings) == {"cifar10-resnet18-fsam-0123456789ab": "F-SAM (λ 0.6) [0123456789ab]",
                                        "cifar10-resnet18-fsam-ba9876543210": "F-SAM (λ 0.6) [ba9876543210]",
                                        "cifar10-resnet18-fsam-ffffffffffff": "F-SAM (λ 0.9)"}


# ------------------------------------------------------------------------------------------------ λ × σ heatmap


HEATMAP = summary_of(
    {"setting": "a", "lmbda": 0.3, "sigma": 0.5, "n": 2, "best_top1_mean": 92.0, "final_top1_mean": 91.0},
    {"setting": "b", "lmbda": 0.6, "sigma": 1.0, "rho": 0.5, "n": 1, "best_top1_mean": 99.0},  # another ρ: left out
    {"setting": "c", "lmbda": 0.3, "sigma": 1.5, "n": 1, "best_top1_mean": 93.5, "final_top1_mean": 93.5},
    {"setting": "d", "lmbda": 0.9, "sigma": 1.5, "n": 3, "best_top1_mean": 95.0, "final_top1_mean": 90.0},
    {"setting": "e", "lmbda": 0.9, "sigma": 0.5, "n": 0, "unfinished": 1},  # never finished: "not run"
    {"setting": "f", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 2, "best_top1_mean": 80.0},
    {"setting": "g", "dataset": "cifar100", "n": 1, "best_top1_mean": 70.0},  # one cell only: no heatmap
)


def cells(axis) -> dict[tuple[float, float], tuple[str, str]]:
    return {tuple(text.get_position()): (text.get_text(), text.get_color()) for text in axis.texts}


def test_the_heatmap_shows_fsams_mean_per_lambda_and_sigma_with_n_and_the_cells_not_run(drawn, tmp_path):
    written = figures.lambda_sigma_heatmap(HEATMAP, tmp_path, "best_top1")
    assert written == [tmp_path / "heatmap_lambda_sigma_CIFAR-10_resnet18.png",
                       tmp_path / "heatmap_lambda_sigma_CIFAR-10_resnet18.pdf"]
    (figure,) = drawn
    axis, colorbar = figure.figure.axes
    (image,) = axis.images
    grid = np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan)
    np.testing.assert_array_equal(grid, [[92.0, 93.5], [np.nan, 95.0]])  # rows λ 0.3, 0.9; columns σ 0.5, 1.5
    # low 92, high 95: text is black where the cell is in the top 40 % of that range (viridis' yellow end)
    assert cells(axis) == {(0, 0): ("92.00\nn=2", "white"), (1, 0): ("93.50\nn=1", "white"),
                           (0, 1): ("not run", "#777777"), (1, 1): ("95.00\nn=3", "black")}
    assert {(text.get_ha(), text.get_va()) for text in axis.texts} == {("center", "center")}  # inside its cell
    assert [label.get_text() for label in axis.get_xticklabels()] == ["0.5", "1.5"]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["0.3", "0.9"]
    assert list(axis.get_xticks()) == [0, 1] and list(axis.get_yticks()) == [0, 1]
    assert axis.get_ylim()[0] < axis.get_ylim()[1]  # λ grows upwards
    assert image.get_cmap().name == "viridis" and axis.get_facecolor() == to_rgba("#eeeeee")  # grey: not run
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("σ (share of the EMA removed)", "λ (EMA decay)")
    assert colorbar.get_ylabel() == BEST and colorbar.get_ylim() == (92.0, 95.0)  # the scale of the cells shown
    assert axis.get_title() == f"F-SAM on CIFAR-10, resnet18: {BEST}\n(ρ 0.2, lr 0.1, epochs 200)"


def test_the_heatmap_draws_the_metric_asked_for(drawn, tmp_path):
    figures.lambda_sigma_heatmap(HEATMAP, tmp_path, "final_top1")
    axis, colorbar = drawn[0].figure.axes
    grid = np.ma.filled(np.ma.asarray(axis.images[0].get_array(), dtype=float), np.nan)
    np.testing.assert_array_equal(grid, [[91.0, 93.5], [np.nan, 90.0]])
    assert cells(axis)[(0, 0)] == ("91.00\nn=2", "white") and cells(axis)[(1, 0)] == ("93.50\nn=1", "black")
    assert colorbar.get_ylabel() == FINAL and axis.get_title().startswith(f"F-SAM on CIFAR-10, resnet18: {FINAL}\n")


def test_the_heatmap_and_the_noise_plot_show_the_headline_final_epoch_unless_told_otherwise(drawn, tmp_path,
                                                                                           monkeypatch, capsys):
    figures.lambda_sigma_heatmap(HEATMAP, tmp_path)
    figures.noise_plot(NOISE, tmp_path)
    assert drawn[0].figure.axes[1].get_ylabel() == FINAL and drawn[1].figure.axes[0].get_ylabel() == FINAL
    root = tmp_path / "runs"
    for lmbda in (0.3, 0.9):
        write_run(root, f"fsam-{lmbda}/seed1", method="fsam", lmbda=lmbda, top1=[90.0, 80.0])
    drawn.clear()
    assert run_script(monkeypatch, "plot", root, "--out-dir", tmp_path / "figures") == 0, capsys.readouterr().err
    (heatmap,) = [d for d in drawn if d.stem.startswith("heatmap")]
    assert heatmap.figure.axes[1].get_ylabel() == FINAL
    assert cells(heatmap.figure.axes[0]) == {(0, 0): ("80.00\nn=1", "white"), (0, 1): ("80.00\nn=1", "white")}


def test_the_heatmap_needs_two_values_of_lambda_or_of_sigma(drawn, tmp_path):
    one_cell = {"setting": "a", "dataset": "cifar10", "n": 1, "best_top1_mean": 90.0}
    two_lambdas = [{"setting": s, "dataset": "cifar100", "lmbda": lmbda, "n": 1, "best_top1_mean": 80.0 + i}
                   for i, (s, lmbda) in enumerate((("b", 0.3), ("c", 0.9)))]
    two_sigmas = [{"setting": s, "dataset": "imagenet", "model": "resnet50", "sigma": sigma, "n": 1,
                   "best_top1_mean": 70.0} for s, sigma in (("d", 0.5), ("e", 1.5))]
    written = figures.lambda_sigma_heatmap(summary_of(one_cell, *two_lambdas, *two_sigmas), tmp_path, "best_top1")
    assert [d.stem for d in drawn] == ["heatmap_lambda_sigma_CIFAR-100_resnet18",
                                       "heatmap_lambda_sigma_ImageNet_resnet50"]
    assert written == [tmp_path / f"{d.stem}.{suffix}" for d in drawn for suffix in ("png", "pdf")]
    lambdas = drawn[0].figure.axes[0]
    assert [label.get_text() for label in lambdas.get_yticklabels()] == ["0.3", "0.9"]
    assert [label.get_text() for label in lambdas.get_xticklabels()] == ["1"]


def test_a_heatmap_cell_of_two_settings_shows_the_first_ones_mean_with_its_own_n(drawn, tmp_path):
    summary = summary_of(
        {"setting": "a", "lmbda": 0.3, "sigma": 0.5, "n": 2, "best_top1_mean": 90.0},
        {"setting": "a2", "lmbda": 0.3, "sigma": 0.5, "batch_size": 256, "n": 1, "best_top1_mean": 96.0},
        {"setting": "b", "lmbda": 0.9, "sigma": 0.5, "n": 1, "best_top1_mean": 93.0},
        {"setting": "c", "lmbda": 0.9, "sigma": 1.5, "n": 1, "best_top1_mean": 95.0},
    )
    figures.lambda_sigma_heatmap(summary, tmp_path, "best_top1")
    # 93 is exactly 60 % of the way from 90 to 95: not above it, so still white
    assert cells(drawn[0].figure.axes[0]) == {(0, 0): ("90.00\nn=2", "white"), (1, 0): ("not run", "#777777"),
                                              (0, 1): ("93.00\nn=1", "white"), (1, 1): ("95.00\nn=1", "black")}


def test_the_heatmap_draws_the_first_settings_rho_even_when_that_is_one_cell(drawn, tmp_path):
    summary = summary_of({"setting": "a", "lmbda": 0.6, "rho": 0.5, "n": 1, "best_top1_mean": 99.0},
                         {"setting": "b", "lmbda": 0.3, "n": 1, "best_top1_mean": 90.0},
                         {"setting": "c", "lmbda": 0.9, "n": 1, "best_top1_mean": 91.0})
    figures.lambda_sigma_heatmap(summary, tmp_path, "best_top1")
    axis = drawn[0].figure.axes[0]
    assert cells(axis) == {(0, 0): ("99.00\nn=1", "white")}
    assert axis.get_title().endswith("\n(ρ 0.5, lr 0.1, epochs 200)")


def test_the_heatmap_of_no_finished_fsam_run_is_not_drawn(drawn, tmp_path):
    summary = summary_of({"setting": "a", "lmbda": 0.3, "n": 0}, {"setting": "b", "lmbda": 0.9, "n": 0},
                         {"setting": "c", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 2, "best_top1_mean": 1.0})
    assert figures.lambda_sigma_heatmap(summary, tmp_path) == [] and drawn == []


# ------------------------------------------------------------------------------------------------ label noise


NOISE = summary_of(
    # clean: SGD at the noisy runs' learning rate (one seed) and at another (three seeds, better): the first is used
    {"setting": "c-sgd-a", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 1, "best_top1_mean": 95.0},
    {"setting": "c-sgd-b", "optimizer": "sgd", **NOT_READ_BY_SGD, "lr": 0.05, "n": 3, "best_top1_mean": 99.0,
     "best_top1_std": 0.2},
    {"setting": "c-fsam", "n": 2, "best_top1_mean": 96.0, "best_top1_std": 0.5, "final_top1_mean": 95.5},
    # clean SAM only, three settings: the most seeds, then the first name
    {"setting": "c-sam", "optimizer": "sam", "sigma": None, "lmbda": None, "n": 1, "best_top1_mean": 99.5},
    {"setting": "c-sam-b", "optimizer": "sam", "sigma": None, "lmbda": None, "rho": 0.1, "n": 3, "best_top1_mean": 94.0},
    {"setting": "c-sam-c", "optimizer": "sam", "sigma": None, "lmbda": None, "rho": 0.3, "n": 3, "best_top1_mean": 98.0},
    {"setting": "n-sgd-20", "optimizer": "sgd", **NOT_READ_BY_SGD, "noise": "symmetric", "noise_ratio": 0.2, "n": 2,
     "best_top1_mean": 85.0, "best_top1_std": 1.0},
    {"setting": "n-sgd-40", "optimizer": "sgd", **NOT_READ_BY_SGD, "noise": "symmetric", "noise_ratio": 0.4, "n": 1,
     "best_top1_mean": 70.0},
    # F-SAM at 20 %: the setting like the others (λ 0.6) is used, not the one with more seeds and a better number
    {"setting": "n-fsam-20", "noise": "symmetric", "noise_ratio": 0.2, "n": 2, "best_top1_mean": 88.0,
     "best_top1_std": 0.4, "final_top1_mean": 87.0},
    {"setting": "n-fsam-20-b", "lmbda": 0.9, "noise": "symmetric", "noise_ratio": 0.2, "n": 3, "best_top1_mean": 90.0,
     "best_top1_std": 0.1},
    {"setting": "n-fsam-40", "noise": "symmetric", "noise_ratio": 0.4, "n": 0, "unfinished": 2},  # not finished
    {"setting": "n-look-20", "optimizer": "lookahead", "noise": "symmetric", "noise_ratio": 0.2, "n": 1,
     "best_top1_mean": 50.0},
    {"setting": "a-sgd-20", "optimizer": "sgd", **NOT_READ_BY_SGD, "noise": "asymmetric", "noise_ratio": 0.2, "n": 1,
     "best_top1_mean": 80.0},
    {"setting": "other", "dataset": "cifar100", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 1,
     "best_top1_mean": 60.0},
)


def error_bars(axis) -> list[tuple[str, str, str, list[tuple[float, float]], list[float]]]:
    """Per errorbar call: label, colour, marker, points and the half-length of each bar."""
    found = []
    for container in axis.containers:
        line, _, (bars,) = container.lines
        half = [round((segment[1][1] - segment[0][1]) / 2, 6) for segment in bars.get_segments()]
        found.append((container.get_label(), line.get_color(), line.get_marker(), points(line), half))
    return found


def test_accuracy_against_label_noise_has_one_line_per_method_from_the_clean_runs_up(drawn, tmp_path):
    written = figures.noise_plot(NOISE, tmp_path, "best_top1")
    assert [d.stem for d in drawn] == ["noise_cifar10_resnet18_asymmetric", "noise_cifar10_resnet18_symmetric"]
    assert written == [tmp_path / f"{d.stem}.{suffix}" for d in drawn for suffix in ("png", "pdf")]
    symmetric = drawn[1].figure.axes[0]
    assert error_bars(symmetric) == [
        ("SGD", SGD, "o", [(0, 95.0), (20, 85.0), (40, 70.0)], [0.0, 1.0, 0.0]),  # one seed: no bar
        ("SAM", SAM, "o", [(0, 94.0)], [0.0]),  # clean runs only: one point, visible through its marker
        ("F-SAM", FSAM, "o", [(0, 96.0), (20, 88.0)], [0.5, 0.4]),
        ("lookahead", "black", "o", [(20, 50.0)], [0.0]),  # a method without a colour or a name: last, black
    ]
    assert legend(symmetric) == ["SGD", "SAM", "F-SAM", "lookahead"]
    assert list(symmetric.get_xticks()) == [0, 20, 40]
    assert symmetric.get_xlabel() == "symmetric label noise (% of training labels)"
    assert symmetric.get_ylabel() == BEST
    assert symmetric.get_title() == ("CIFAR-10, resnet18: accuracy against symmetric label noise\n"
                                     "mean over seeds, bars ± 1 std (n ≥ 2)")
    asymmetric = drawn[0].figure.axes[0]
    assert [(label, xy) for label, _, _, xy, _ in error_bars(asymmetric)] == [
        ("SGD", [(0, 95.0), (20, 80.0)]), ("SAM", [(0, 94.0)]), ("F-SAM", [(0, 96.0)])]
    assert asymmetric.get_xlabel() == "asymmetric label noise (% of training labels)"


def test_the_noise_plot_draws_the_metric_asked_for_and_names_cifar_100(drawn, tmp_path):
    summary = summary_of(
        {"setting": "a", "dataset": "cifar100", "n": 1, "final_top1_mean": 70.0, "final_top1_std": math.nan},
        {"setting": "b", "dataset": "cifar100", "noise": "symmetric", "noise_ratio": 0.5, "n": 2,
         "final_top1_mean": 50.0, "final_top1_std": 2.0},
        {"setting": "c", "dataset": "digits", "noise": "symmetric", "noise_ratio": 0.1, "n": 1, "final_top1_mean": 9.0},
    )
    figures.noise_plot(summary, tmp_path, "final_top1")
    cifar100, digits = (d.figure.axes[0] for d in drawn)
    assert error_bars(cifar100) == [("F-SAM", FSAM, "o", [(0, 70.0), (50, 50.0)], [0.0, 2.0])]
    assert cifar100.get_ylabel() == FINAL
    assert cifar100.get_title().startswith("CIFAR-100, resnet18: accuracy against symmetric label noise\n")
    assert digits.get_title().startswith("digits, resnet18: ")


def test_no_finished_noisy_run_draws_no_noise_plot(drawn, tmp_path):
    summary = summary_of({"setting": "a", "n": 2, "best_top1_mean": 90.0},
                         {"setting": "b", "noise": "symmetric", "noise_ratio": 0.2, "n": 0})
    assert figures.noise_plot(summary, tmp_path) == [] and drawn == []


# ------------------------------------------------------------------------------------------------ EMA agreement


def test_the_ema_figure_shows_each_measurement_of_each_run_against_its_step(tmp_path, drawn):
    root = tmp_path / "runs"
    measured = [[{"step": 5, "ema_cosine": 0.9, "ema_relative_error": 0.45},
                 {"step": 10, "ema_cosine": 0.95, "ema_relative_error": 0.3}],
                [{"step": 15, "ema_cosine": 0.97, "ema_relative_error": 0.25}]]
    # read in this order: the runs without measurements come first and must not stop the others
    empty = write_run(root, "a-sam/seed1", method="sam", state="unfinished")
    (empty / "metrics.jsonl").write_text("")
    write_run(root, "b-fsam-quiet/seed1", method="fsam", lmbda=0.9, analysis=[[], []])  # measured nothing
    write_run(root, "c-sgd/seed1")  # no measurements at all
    write_run(root, "d-fsam/seed2", method="fsam", seed=2, analysis=measured)
    runs = load_runs(root)
    written = figures.ema_agreement(runs, tmp_path / "figures")
    setting = setting_of(runs, optimizer="fsam", lmbda=0.6)
    (figure,) = drawn
    assert figure.stem == f"ema_vs_full_gradient_{setting}_seed2"
    assert written == [tmp_path / "figures" / f"{figure.stem}.png", tmp_path / "figures" / f"{figure.stem}.pdf"]
    cosine, error = figure.figure.axes
    assert points(cosine.lines[0]) == [(5, 0.9), (10, 0.95), (15, 0.97)]
    assert points(error.lines[0]) == [(5, 0.45), (10, 0.3), (15, 0.25)]
    for axis in (cosine, error):
        (line,) = axis.lines
        assert (line.get_color(), line.get_marker(), line.get_linestyle()) == (FSAM, "o", "-")
        assert axis.get_xlabel() == "training step"
    assert (cosine.get_title(), cosine.get_ylabel()) == ("Direction", "cosine(EMA, full gradient)")
    assert (error.get_title(), error.get_ylabel()) == ("Relative error", "||EMA − full|| / ||full||")
    assert figure.figure.get_suptitle() == ("CIFAR-10, resnet18, F-SAM seed 2: the EMA against the exact "
                                            "full-batch gradient")


def test_an_ema_figure_of_a_method_without_a_colour_or_a_name_uses_black_and_its_own_name(tmp_path, drawn):
    write_run(tmp_path / "runs", "fsam/seed1", method="fsam",
              analysis=[[{"step": 1, "ema_cosine": 0.5, "ema_relative_error": 0.5}]])
    figures.ema_agreement(load_runs(tmp_path / "runs").assign(optimizer="newmethod"), tmp_path)
    cosine, _ = drawn[0].figure.axes
    assert cosine.lines[0].get_color() == "black"
    assert drawn[0].figure.get_suptitle().startswith("CIFAR-10, resnet18, newmethod seed 1: ")


def test_every_run_that_measured_gets_its_own_ema_figure(tmp_path, drawn):
    root = tmp_path / "runs"
    for seed in (1, 2):
        write_run(root, f"fsam/seed{seed}", method="fsam", seed=seed, noise=0.2,
                  analysis=[[{"step": seed, "ema_cosine": 0.5, "ema_relative_error": 0.5}]])
    runs = load_runs(root)
    written = figures.ema_agreement(runs, tmp_path)
    setting = runs["setting"].iloc[0]
    assert [d.stem for d in drawn] == [f"ema_vs_full_gradient_{setting}_seed1", f"ema_vs_full_gradient_{setting}_seed2"]
    assert len(written) == 4
    assert drawn[1].figure.get_suptitle().startswith("CIFAR-10 (symmetric 20% noise), resnet18, F-SAM seed 2: ")


# ------------------------------------------------------------------------------------------------ tables: cells


@pytest.mark.parametrize(("arguments", "cell"), [
    ((91.0, math.nan, 1), "91.00 (n=1)"),  # one seed: no spread, and not flagged unless asked
    ((91.004, 1.416, 2), "91.00 ± 1.42 (n=2)"),
    ((math.nan, math.nan, 2), "— (n=2)"),  # finished runs without this metric
    ((5.0, math.nan, 0), "— (n=0)"),
    ((92.0, 0.5, 3, {"unfinished": 1, "running": 0, "diverged": 2}, True), "92.00 ± 0.50 (n=3; 1 unfinished; 2 diverged) †"),
])
def test_a_cell_is_mean_std_and_counts(arguments, cell):
    assert format_cell(*arguments) == cell


@pytest.mark.parametrize(("row", "label"), [
    ({"dataset": "cifar10", "noise": "none", "noise_ratio": None, "model": "resnet18"}, ("CIFAR-10", "resnet18")),
    ({"dataset": "cifar100", "noise": "symmetric", "noise_ratio": 0.2, "model": "wrn28_10"},
     ("CIFAR-100 (symmetric 20% noise)", "wrn28_10")),
    ({"dataset": "svhn", "noise": "asymmetric", "noise_ratio": 0.125, "model": "m"}, ("svhn (asymmetric 12.5% noise)", "m")),
    ({"dataset": "imagenet", "noise": math.nan, "noise_ratio": math.nan, "model": "resnet50"}, ("ImageNet", "resnet50")),
    ({"dataset": "digits", "noise": None, "noise_ratio": None, "model": "mlp"}, ("digits", "mlp")),
    ({"dataset": "digits", "model": "mlp"}, ("digits", "mlp")),
])
def test_a_row_is_labelled_by_data_set_with_its_noise_and_by_model(row, label):
    assert row_label(pd.Series(row)) == label


@pytest.mark.parametrize(("text", "escaped"), [
    ("\\&%$#_{}~^", r"\textbackslash{}\&\%\$\#\_\{\}\textasciitilde{}\textasciicircum{}"),
    ("±Δ—†", r"$\pm$$\Delta$---$^\dagger$"),
    ("plain text, 91.00 (n=2)", "plain text, 91.00 (n=2)"),
    ("", ""),
])
def test_latex_escapes_every_special_character_once(text, escaped):
    assert _latex_escape(text) == escaped


@pytest.mark.parametrize(("value", "cell"), [
    (None, ""), (math.nan, ""), (np.float64("nan"), ""), (0.5, "0.5"), (3.0, "3"), (1e-05, "1e-05"),
    (np.float64(0.25), "0.25"), (7, "7"), (np.int64(128), "128"), ("a_b", "a_b"), (True, "True"),
])
def test_latex_cells_write_numbers_short_and_nothing_for_missing_values(value, cell):
    assert _latex_cell(value) == cell


def test_to_latex_writes_the_row_labels_as_the_first_columns():
    table = pd.DataFrame({"SGD": ["91.00 ± 1.41 (n=2)", "—"], "SGD published": ["90.50 [a_b], Δ +0.50", ""]},
                         index=pd.MultiIndex.from_tuples([("CIFAR-10", "resnet18"), ("CIFAR-100", "wrn28_10")],
                                                         names=["data set", "model"]))
    assert to_latex(table, "Top-1 (%) & more", "tab:paper-best_top1") == "\n".join([
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{Top-1 (\%) \& more}",
        r"\label{tab:paper-best_top1}",
        r"\begin{tabular}{llll}",
        r"\toprule",
        r"data set & model & SGD & SGD published \\",
        r"\midrule",
        r"CIFAR-10 & resnet18 & 91.00 $\pm$ 1.41 (n=2) & 90.50 [a\_b], $\Delta$ +0.50 \\",
        r"CIFAR-100 & wrn28\_10 & --- &  \\",
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
        "",
    ])


def test_to_latex_of_a_plain_table_has_no_index_column():
    table = pd.DataFrame({"setting": ["s_1", "s_2"], "lr": [0.1, 1e-05], "rho": [None, 0.05], "n": [2, 3]})
    tex = to_latex(table, "Per setting", "tab:settings")
    assert tex.splitlines()[4:10] == [
        r"\begin{tabular}{llll}",
        r"\toprule",
        r"setting & lr & rho & n \\",
        r"\midrule",
        r"s\_1 & 0.1 &  & 2 \\",
        r"s\_2 & 1e-05 & 0.05 & 3 \\",
    ]


# ------------------------------------------------------------------------------------------------ tables: frames


def test_summarise_of_no_readable_run_is_an_empty_table_with_every_column():
    columns = ["setting", "dataset", "noise", "noise_ratio", "model", "optimizer", "base", "lr", "weight_decay", "rho",
               "sigma", "lmbda", "epochs", "batch_size", "n", "unfinished", "running", "diverged", "short",
               "final_top1_mean", "final_top1_std", "test_top1_at_best_val_mean", "test_top1_at_best_val_std",
               "best_top1_mean", "best_top1_std"]
    unreadable = pd.DataFrame({"setting": [None, None], "status": ["finished", "unfinished"], "best_top1": [1.0, None]})
    for runs in (pd.DataFrame(), pd.DataFrame({"run_dir": ["x"]}), unreadable):
        table = summarise(runs)
        assert table.empty and list(table.columns) == columns


def test_summarise_lists_settings_by_name_whatever_order_the_runs_come_in():
    runs = pd.DataFrame([
        {"setting": "b", "status": "finished", "optimizer": "sgd", "best_top1": 90.0, "final_top1": 89.0},
        {"setting": "a", "status": "finished", "optimizer": "fsam", "best_top1": 92.0, "final_top1": 91.0},
        {"setting": "c", "status": "unfinished", "optimizer": "sam", "best_top1": None, "final_top1": None},
        {"setting": "a", "status": "finished", "optimizer": "fsam", "best_top1": 94.0, "final_top1": 91.0},
    ])
    table = summarise(runs, seeds_expected=2)
    assert list(table["setting"]) == ["a", "b", "c"]
    assert list(table["n"]) == [2, 1, 0] and list(table["short"]) == [False, True, True]
    assert list(table["best_top1_mean"][:2]) == [93.0, 90.0] and math.isnan(table["best_top1_mean"][2])
    assert table["best_top1_std"][0] == pytest.approx(2 ** 0.5) and math.isnan(table["best_top1_std"][1])
    assert table["test_top1_at_best_val_mean"].isna().all()  # no run has a validation split


def test_the_reported_metrics_are_the_final_epoch_first_the_validation_pick_where_measured_the_best_test_epoch_last():
    nothing_finished = summary_of({"setting": "a", "n": 0})
    assert reported_metrics(nothing_finished) == ["final_top1", "best_top1"]
    with_validation = summary_of({"setting": "a", "n": 1, "best_top1_mean": 1.0, "final_top1_mean": 1.0},
                                 {"setting": "b", "n": 1, "best_top1_mean": 1.0, "test_top1_at_best_val_mean": 1.0})
    assert reported_metrics(with_validation) == ["final_top1", "test_top1_at_best_val", "best_top1"]


def test_the_settings_table_leaves_out_columns_no_setting_fills():
    sgd_only = summary_of({"setting": "a", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 1, "best_top1_mean": 90.0,
                           "final_top1_mean": 89.0})
    table = settings_table(sgd_only)
    assert list(table.columns) == ["setting", "dataset", "model", "optimizer", "base", "lr", "weight_decay", "epochs",
                                   "batch_size", FINAL, BEST]  # no noise, no rho / sigma / lambda
    assert table.iloc[0][BEST] == "90.00 (n=1)"
    noisy = summary_of({"setting": "a", "n": 1, "best_top1_mean": 90.0},
                       {"setting": "b", "noise": "symmetric", "noise_ratio": 0.2, "n": 1, "best_top1_mean": 80.0,
                        "test_top1_at_best_val_mean": 79.0})
    table = settings_table(noisy)
    assert list(table.columns[:4]) == ["setting", "dataset", "noise", "noise_ratio"]
    assert list(table["noise"]) == ["none", "symmetric"] and list(table["noise_ratio"]) == ["", 0.2]
    assert list(table[AT_VAL]) == ["— (n=1)", "79.00 (n=1)"]


PAPER = summary_of(
    {"setting": "a", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 2, "best_top1_mean": 91.0, "best_top1_std": 1.5},
    {"setting": "b", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 2, "best_top1_mean": 96.0, "best_top1_std": 0.5},
    {"setting": "c", "optimizer": "sgd", **NOT_READ_BY_SGD, "n": 1, "best_top1_mean": 99.0},
    {"setting": "d", "optimizer": "lookahead", "n": 1, "best_top1_mean": 80.0, "short": True},
    {"setting": "d2", "optimizer": "lookahead", "n": 0, "running": 1, "short": True},
    {"setting": "e", "dataset": "cifar100", "n": 0, "unfinished": 1, "running": 1},
    {"setting": "f", "n": 1, "diverged": 1, "best_top1_mean": 93.0},
)
KNOWN = pd.DataFrame([
    {"source": "src", "dataset": "cifar10", "model": "resnet18", "optimizer": "sgd", "rho": None, "lambda": None,
     "sigma": None, "epochs": None, "batch": None, "metric": "top1_best", "value": 90.5, "seeds": 1, "note": ""},
    {"source": "pub", "dataset": "cifar100", "model": "resnet18", "optimizer": "fsam", "rho": 0.2, "lambda": None,
     "sigma": None, "epochs": 200, "batch": None, "metric": "top1_best", "value": 77.0, "seeds": 1, "note": ""},
])


def test_the_paper_layout_is_the_one_written_by_hand():
    layout = paper_layout(PAPER, "best_top1", KNOWN)
    assert layout.metric == "best_top1"
    assert list(layout.table.index) == [("CIFAR-10", "resnet18"), ("CIFAR-100", "resnet18")]
    assert list(layout.table.index.names) == ["data set", "model"]
    assert layout.table.to_dict("index") == {
        ("CIFAR-10", "resnet18"): {
            "SGD": "91.00 ± 1.50 (n=2)",  # most seeds, then the first name: a, not the better b or c
            "SGD published": "90.50 [src], Δ +0.50",
            "F-SAM": "93.00 (n=1; 1 diverged)", "F-SAM published": "not available",
            "lookahead": "80.00 (n=1) †", "lookahead published": "not available",
        },
        ("CIFAR-100", "resnet18"): {
            "SGD": "", "SGD published": "",  # no run there: blank
            "F-SAM": "— (n=0; 1 unfinished; 1 running)", "F-SAM published": "77.00 [pub]",  # no Δ without a mean
            "lookahead": "", "lookahead published": "",
        },
    }
    # in the order of the per-setting table
    assert layout.notes == [
        "CIFAR-10 / resnet18 / SGD: 3 settings; shown a (most finished seeds, n=2); also run: b, c (see the "
        "per-setting table)",
        "CIFAR-10 / resnet18 / lookahead: 2 settings; shown d (most finished seeds, n=1); also run: d2 (see the "
        "per-setting table)",
    ]


def test_the_paper_layouts_numbers_are_one_row_per_cell_with_mean_std_and_n_as_numbers():
    layout = paper_layout(PAPER, "best_top1", KNOWN)
    values = layout.values
    assert list(values.columns) == ["dataset", "model", "method", "setting", "mean", "std", "n", "unfinished",
                                    "running", "diverged", "short", "published", "published_source", "difference"]
    # in the table's order: rows by data set and model, then the methods in their order
    assert values[["dataset", "method", "setting", "n", "unfinished", "running", "diverged", "short"]].to_dict(
        "split")["data"] == [["CIFAR-10", "SGD", "a", 2, 0, 0, 0, False], ["CIFAR-10", "F-SAM", "f", 1, 0, 0, 1, False],
                             ["CIFAR-10", "lookahead", "d", 1, 0, 0, 0, True],
                             ["CIFAR-100", "F-SAM", "e", 0, 1, 1, 0, False]]
    assert values["mean"].tolist()[:3] == [91.0, 93.0, 80.0] and math.isnan(values["mean"][3])
    assert values["std"].tolist()[0] == 1.5 and values["std"][1:].isna().all()
    assert values["published"].tolist()[0] == 90.5 and values["published"][3] == 77.0
    assert [source if isinstance(source, str) else None for source in values["published_source"]] == [
        "src", None, None, "pub"]
    assert values["difference"].tolist()[0] == 0.5 and values["difference"][1:].isna().all()
    assert all(pd.api.types.is_numeric_dtype(values[column]) for column in
               ("mean", "std", "n", "unfinished", "running", "diverged", "published", "difference"))


def test_every_caption_defines_the_spread_and_says_how_its_numbers_were_chosen():
    spread = ("mean ± sample standard deviation over the finished seeds (n − 1 denominator; no ± for one seed), "
              "n finished seeds")
    assert layout_caption("final_top1").startswith(
        f"Final-epoch test top-1 (%): the last epoch's test top-1, no epoch is chosen. Cells: {spread}. Published: ")
    assert layout_caption("best_top1").startswith(f"{BEST[0].upper()}{BEST[1:]}: the highest test top-1 of any "
                                                  "epoch, so the epoch is chosen on the test set")
    assert layout_caption("final_top1").endswith("not available where none could be obtained for that setting.")
    assert settings_caption(["final_top1", "test_top1_at_best_val"]) == (
        f"Results per setting. Cells: {spread}. Final-epoch test top-1 (%): the last epoch's test top-1, no epoch is "
        "chosen. Test top-1 at the best validation epoch (%): the test top-1 at the epoch of the best validation "
        "top-1 (runs with a validation split, dataset.val_split).")


def test_the_paper_layout_without_published_numbers_or_without_runs():
    layout = paper_layout(PAPER, "best_top1")
    assert set(layout.table["SGD published"]) == {"not available", ""}
    empty = paper_layout(summary_of().iloc[0:0], "final_top1", KNOWN)
    assert empty.metric == "final_top1" and isinstance(empty.table, pd.DataFrame) and empty.table.empty
    assert empty.notes == [] and empty.values.empty


def test_a_published_number_needs_a_table_and_a_metric_it_has():
    row = PAPER.iloc[0]
    assert published_value(KNOWN, row, "best_top1") == (90.5, "src")
    assert published_value(None, row, "best_top1") is None
    assert published_value(KNOWN.iloc[0:0], row, "best_top1") is None
    assert published_value(KNOWN, row, "test_top1_at_best_val") is None  # never published


def test_the_reference_table_lists_every_published_number_then_the_papers_missing_cells(tmp_path):
    known = tmp_path / "known.csv"
    known.write_text("source,dataset,model,optimizer,rho,lambda,sigma,epochs,batch,metric,value,seeds,note\n"
                     "src-a,cifar10,resnet18,sgd,,,,200,128,top1_best,95.126,1,from the paper\n"
                     "src-b,cifar100,wrn28_10,sam,0.1,,,200,128,top1_final,80.5,3,\n")
    reference = reference_table(known)
    assert list(reference.columns) == ["source", "dataset", "model", "optimizer", "metric", "value", "note"]
    rows = reference.to_dict("records")
    assert rows[:2] == [
        {"source": "src-a", "dataset": "cifar10", "model": "resnet18", "optimizer": "sgd", "metric": "top1_best",
         "value": "95.13", "note": "from the paper"},
        {"source": "src-b", "dataset": "cifar100", "model": "wrn28_10", "optimizer": "sam", "metric": "top1_final",
         "value": "80.50", "note": ""},
    ]
    assert rows[2:] == [
        {"source": "paper-table (main CIFAR results)", "dataset": dataset, "model": model, "optimizer": method,
         "metric": "top1", "value": "not available",
         "note": "the paper's table could not be obtained; never filled by hand"}
        for dataset in ("cifar10", "cifar100") for model in ("resnet18", "wrn28_10", "pyramidnet110")
        for method in ("sgd", "sam", "fsam")
    ]


# ------------------------------------------------------------------------------------------------ reading runs


def test_runs_under_refuses_a_missing_folder_and_an_empty_one_in_words(tmp_path):
    advice = ": pass the folder your runs were written to (FSAM_RUNS, default runs/)"
    for root in (None, tmp_path / "nowhere", tmp_path / "file.txt"):
        (tmp_path / "file.txt").write_text("x")
        with pytest.raises(FsamError) as error:
            runs_under(root)
        assert str(error.value) == f"no run folder at {root}{advice}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FsamError) as error:
        runs_under(tmp_path / "empty")
    assert str(error.value) == (f"no run folders (with config.yaml) under {tmp_path / 'empty'}: train something "
                                "first, e.g. python train.py experiment=quickstart")
    write_run(tmp_path / "runs", "sgd/seed1")
    assert list(runs_under(tmp_path / "runs")["run_dir"]) == [str(tmp_path / "runs" / "sgd" / "seed1")]


def test_folders_that_do_not_parse_or_check_are_listed_as_damaged_with_the_reason_and_not_tabulated(tmp_path):
    root = tmp_path / "runs"
    (root / "a-broken").mkdir(parents=True)
    (root / "a-broken" / "config.yaml").write_text("optimizer: [unclosed\n")  # sorts first: the rest is still read
    good = write_run(root, "b-good/seed1", top1=[70.0, 80.0])
    old = write_run(root, "c-old/seed1", lr=0.05)
    config = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text(config.replace("  name: sgd\n", "  name: lookahead\n"))  # no longer a method
    runs = load_runs(root)
    assert list(runs["run_dir"]) == [str(root / "a-broken"), str(good), str(old)]
    assert list(runs["status"]) == ["damaged", "finished", "damaged"]
    assert runs.iloc[0]["problem"] == "config.yaml is not valid YAML (cut short or edited)"
    assert pd.isna(runs.iloc[1]["problem"]) and runs.iloc[1]["best_top1"] == 80.0
    unknown = runs.iloc[2]
    assert unknown["problem"].startswith("config.yaml does not check (optimizer.name='lookahead' is not ")
    # described by what its config says, but with no setting and no numbers: nothing of it reaches a table
    assert pd.isna(unknown["setting"]) and unknown["optimizer"] == "lookahead" and unknown["model"] == "resnet18"
    assert unknown["lr"] == 0.05 and pd.isna(unknown["best_top1"])
    assert list(summarise(runs)["n"]) == [1]
    assert damaged(runs) == [f"damaged: {root / 'a-broken'}: config.yaml is not valid YAML (cut short or edited)",
                             f"damaged: {old}: {unknown['problem']}"]


def test_a_folder_whose_model_options_no_longer_check_is_listed_under_its_model_name(tmp_path):
    folder = write_run(tmp_path, "run", model="pyramidnet110", model_kwargs={"depth": 8})
    record = yaml.safe_load((folder / "config.yaml").read_text())
    record["model"]["kwargs"]["depth"] = "eight"  # a value the builder refuses: no identity can be computed
    (folder / "config.yaml").write_text(yaml.safe_dump(record))
    (row,) = load_runs(tmp_path).to_dict("records")
    assert pd.isna(row["setting"]) and row["model"] == "pyramidnet110" and row["status"] == "damaged"
    assert row["problem"].startswith("config.yaml does not check (model.kwargs.depth='eight' is not allowed")


def identity_named(root: Path, **options) -> Path:
    """A finished run written by ``write_run`` and moved to where the engine puts it: ``<setting name>/seed<N>``."""
    folder = write_run(root, "scratch/seed1", **options)
    name = json.loads((folder / "summary.json").read_text())["setting"]
    (root / name).mkdir(parents=True)
    return folder.rename(root / name / "seed1")


def edit_yaml(path: Path, change) -> None:
    record = yaml.safe_load(path.read_text())
    change(record)
    path.write_text(yaml.safe_dump(record, sort_keys=False))


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_a_summary_that_is_not_json_is_a_damaged_folder_never_a_finished_seed(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "sgd/seed1", seed=1, top1=[90.0, 91.0])
    cut = write_run(root, "sgd/seed2", seed=2, top1=[10.0, 12.0])
    (cut / "summary.json").write_text('{"best_top1": 9')  # cut short
    runs = load_runs(root)
    assert list(runs["status"]) == ["finished", "damaged"]
    assert runs.iloc[1]["problem"] == "summary.json is not a JSON object (cut short or edited)"
    (row,) = summarise(runs).to_dict("records")
    assert (row["n"], row["final_top1_mean"]) == (1, 91.0) and math.isnan(row["final_top1_std"])


@pytest.mark.parametrize("carrier", ["its recorded identity", "the folder name", "summary.json"])
def test_a_config_edited_after_the_run_is_damaged_by_whichever_record_carries_the_digest_it_trained(tmp_path,
                                                                                                  carrier):
    root = tmp_path / "runs"
    folder = identity_named(root, lr=0.1)
    trained = folder.parent.name[-12:]
    if carrier != "its recorded identity":
        edit_yaml(folder / "config.yaml", lambda record: record.pop("identity"))
    if carrier != "summary.json":
        edit_json(folder / "summary.json", lambda record: record.pop("setting"))
    if carrier != "the folder name":
        folder = folder.rename(root / "kept-by-hand")
    edit_yaml(folder / "config.yaml", lambda record: record["optimizer"].update(lr=0.5))
    edited = load_runs(root)
    (row,) = edited.to_dict("records")
    computed = RunFolder(folder).read_config()[1]["digest"][:12]
    assert row["status"] == "damaged" and pd.isna(row["setting"])
    assert row["problem"] == (f"config.yaml computes setting {computed}, but {carrier} records {trained} "
                              "(edited after the run)")
    assert summarise(edited).empty  # lr 0.5 never trained: no row of it


def test_a_summary_carries_its_digest_whole_or_in_its_setting_name(tmp_path):
    folder = write_run(tmp_path / "runs", "kept/seed1")
    edit_yaml(folder / "config.yaml", lambda record: record.pop("identity"))
    edit_json(folder / "summary.json", lambda record: record.update(setting_digest="0" * 64, setting="x-sgd"))
    assert RunFolder(folder).problem().endswith(f"but summary.json records {'0' * 12} (edited after the run)")


def test_every_place_that_records_another_digest_is_named_with_it(tmp_path):
    folder = identity_named(tmp_path / "runs")
    trained = folder.parent.name[-12:]
    edit_json(folder / "summary.json", lambda record: record.update(setting="other-abcdefabcdef"))
    edit_yaml(folder / "config.yaml", lambda record: record["trainer"].update(epochs=3))
    computed = RunFolder(folder).read_config()[1]["digest"][:12]
    assert RunFolder(folder).problem() == (
        f"config.yaml computes setting {computed}, but its recorded identity and the folder name record {trained}; "
        "summary.json records abcdefabcdef (edited after the run)")


def test_a_config_whose_seed_was_edited_after_the_run_is_damaged(tmp_path):
    folder = identity_named(tmp_path / "runs", seed=1)
    edit_yaml(folder / "config.yaml", lambda record: record["trainer"].update(seed=2))
    assert RunFolder(folder).problem() == ("config.yaml has seed 2, but its recorded identity, the folder name and "
                                           "summary.json record 1 (edited after the run)")
    edit_yaml(folder / "config.yaml", lambda record: record.pop("identity"))
    edit_json(folder / "summary.json", lambda record: record.update(seed=3))
    assert RunFolder(folder).problem() == ("config.yaml has seed 2, but the folder name records 1; summary.json "
                                           "records 3 (edited after the run)")


def test_folders_from_before_identities_are_read_on_their_records_alone(tmp_path):
    root = tmp_path / "runs"
    folder = write_run(root, "quickstart/optimizer=sgd/seed1", top1=[80.0, 85.0])
    edit_yaml(folder / "config.yaml", lambda record: record.pop("identity"))
    edit_json(folder / "summary.json", lambda record: record.pop("setting"))
    (row,) = load_runs(root).to_dict("records")
    assert row["status"] == "finished" and pd.isna(row["problem"]) and row["final_top1"] == 85.0
    assert row["setting"].startswith("cifar10-resnet18-sgd-")  # computed from its config, as new runs' are


def test_a_digest_of_another_identity_version_is_not_compared(tmp_path):
    folder = identity_named(tmp_path / "runs")
    moved = folder.rename(tmp_path / "runs" / "kept")  # only the identity and the summary carry the digest
    edit_yaml(moved / "config.yaml", lambda record: record["identity"].update(identity_version=0, digest="f" * 64))
    edit_json(moved / "summary.json", lambda record: record.update(setting="x-" + "f" * 12))
    assert RunFolder(moved).problem() is None
    edit_yaml(moved / "config.yaml", lambda record: record["identity"].update(identity_version=1))
    assert RunFolder(moved).problem().endswith(
        "but its recorded identity and summary.json record ffffffffffff (edited after the run)")


@pytest.mark.parametrize(("metrics", "problem"), [
    ('{"epoch": 1}\n{"epoch": 2', "metrics.jsonl line 2 is not JSON (cut short or edited)"),
    ('{"epoch": 1}\n', "finished, but metrics.jsonl holds epochs [1] where the config trains 2"),
    ('{"epoch": 1}\n[2]\n', "finished, but metrics.jsonl holds epochs [1, None] where the config trains 2"),
    ("", "finished, but metrics.jsonl holds epochs none where the config trains 2"),
    (None, "finished, but metrics.jsonl is missing"),
])
def test_a_finished_run_needs_every_epoch_of_its_metrics_in_lines_that_parse(tmp_path, metrics, problem):
    folder = write_run(tmp_path / "runs", "sgd/seed1", top1=[50.0, 60.0])
    if metrics is None:
        (folder / "metrics.jsonl").unlink()
    else:
        (folder / "metrics.jsonl").write_text(metrics)
    assert RunFolder(folder).problem() == problem
    (folder / "summary.json").unlink()
    assert RunFolder(folder).problem() is None  # an unfinished run may have been killed mid-line


def test_records_without_a_config_are_a_damaged_folder_and_wandbs_own_files_no_folder_at_all(tmp_path):
    root = tmp_path / "runs"
    run = write_run(root, "a/seed1")
    online = run / "wandb" / "run-20260101_000000-abc" / "files"
    online.mkdir(parents=True)
    (online / "config.yaml").write_text("_wandb:\n  value: {}\n")  # what an online wandb run keeps there
    for name in ("summary.json", "metrics.jsonl"):
        orphan = root / f"only-{name}"
        orphan.mkdir()
        (orphan / name).write_text("{}\n")
    runs = load_runs(root)
    assert list(runs["run_dir"]) == [str(run), str(root / "only-metrics.jsonl"), str(root / "only-summary.json")]
    assert list(runs["status"]) == ["finished", "damaged", "damaged"]
    assert list(runs["problem"][1:]) == ["no config.yaml", "no config.yaml"]


def test_sam_with_an_analysis_direction_is_its_own_method(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "sam/seed1", method="sam")
    write_run(root, "sam-full/seed1", method="sam", optimizer={"perturbation": "full"})
    write_run(root, "sam-noise/seed1", method="sam", optimizer={"perturbation": "noise"})
    write_run(root, "fsam/seed1", method="fsam")
    runs = load_runs(root)
    assert list(runs["optimizer"]) == ["fsam", "sam", "sam-full-gradient-only", "sam-noise-only"]


def test_the_summary_adds_its_numbers_and_never_overwrites_the_config(tmp_path):
    write_run(tmp_path, "run", lr=0.1, summary={"lr": 999.0, "per_class": [1.0, 2.0], "wandb_id": None,
                                                "images_per_s": 123.5, "note": "text"})
    (row,) = load_runs(tmp_path).to_dict("records")
    assert row["lr"] == 0.1 and row["images_per_s"] == 123.5 and row["note"] == "text"
    assert "per_class" not in row and "wandb_id" not in row  # lists and nothing are not table cells
    assert row["model"] == "resnet18" and row["model_parameters"] == 11_173_962  # the record, not summary's dict


# ------------------------------------------------------------------------------------------------ wandb


def offline_run(folder: Path) -> Path:
    (run_folder,) = (folder / "wandb").glob("offline-run-*")
    return run_folder


def table_file(run_folder: Path, logged: dict, key: str) -> dict:
    return json.loads((run_folder / "files" / logged[f"{key}/path"]).read_text())


def test_log_tables_stores_each_table_and_chart_in_one_report_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the mode asked for wins over the environment's
    monkeypatch.delenv("WANDB_SILENT")  # quiet by its own settings
    paper = pd.DataFrame({"SGD": pd.Series(["91.00 (n=1)", None], dtype=object), 5: [1.5, 2.5]}).set_axis(
        pd.MultiIndex.from_tuples([("CIFAR-10", "r18"), ("CIFAR-100", "r18")], names=["data set", "model"]))
    plain = pd.DataFrame({"setting": ["s1"], "lr": [0.1], "n": [2]})
    points = pd.DataFrame({"label": ["a", "b", "c"], "method": ["sgd", "sam", "fsam"], "setting": ["s1", "s2", "s3"],
                           "mean": [91.25, None, 93.5], "std": [0.5, None, None], "n": [2, 0, 1]})
    folder = tmp_path / "new" / "out"
    where = log_tables({"paper": paper, "plain": plain}, {"top1": MeanChart(points, "Top-1", "top-1 (%)")},
                       project="proj", entity="ent", mode="offline", folder=folder, name="my-tables")
    run_folder = offline_run(folder)
    assert where == str(run_folder)
    printed = capfd.readouterr()
    assert "wandb" not in printed.out + printed.err  # silent, no warning: offline was asked for
    record = read_run(run_folder)
    run = record["run"]
    assert (run.project, run.entity, run.job_type, run.display_name) == ("proj", "ent", "report", "my-tables")
    (logged,) = record["history"]
    assert {key: value for key, value in logged.items() if key.endswith("/_type")} == {
        "tables/paper/_type": "table-file", "tables/plain/_type": "table-file", "charts/top1/_type": "image-file",
        "charts/top1_table/_type": "table-file"}
    paper_table = table_file(run_folder, logged, "tables/paper")
    assert paper_table["columns"] == ["data set", "model", "SGD", "5"]
    assert paper_table["data"] == [["CIFAR-10", "r18", "91.00 (n=1)", 1.5], ["CIFAR-100", "r18", "", 2.5]]
    plain_table = table_file(run_folder, logged, "tables/plain")
    assert (plain_table["columns"], plain_table["data"]) == (["setting", "lr", "n"], [["s1", 0.1, 2]])
    chart = table_file(run_folder, logged, "charts/top1_table")
    assert chart["columns"] == ["label", "method", "setting", "mean", "std", "n"]
    assert chart["data"][0] == ["a", "sgd", "s1", 91.25, 0.5, 2] and chart["data"][1][:4] == ["c", "fsam", "s3", 93.5]
    assert len(chart["data"]) == 2 and math.isnan(chart["data"][1][4])  # no point without a mean
    image = run_folder / "files" / logged["charts/top1/path"]
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (logged["charts/top1/width"], logged["charts/top1/height"]) == (800, 230)  # two rows: 8 x (0.4 x 2 + 1.5) in
    assert not plt.get_fignums()  # drawn, logged and closed
    assert not (run_folder / "files" / "output.log").exists()  # the console is not captured


def sideways_error_bars(axis) -> list[tuple[str, str, list[tuple[float, float]], list[float]]]:
    """Per errorbar call with horizontal bars: colour, marker, points and the half-length of each bar."""
    found = []
    for container in axis.containers:
        line, _, (bars,) = container.lines
        half = [round((segment[1][0] - segment[0][0]) / 2, 6) for segment in bars.get_segments()]
        found.append((line.get_color(), line.get_marker(), [(float(x), float(y)) for x, y in line.get_xydata()], half))
    return found


def test_a_mean_chart_draws_each_unrounded_mean_with_an_error_bar_of_one_std_in_its_methods_colour():
    points = pd.DataFrame({"label": ["CIFAR-10 / r18 / SGD", "CIFAR-10 / r18 / F-SAM (λ 0.3)", "x / newmethod"],
                           "method": ["sgd", "fsam", "newmethod"], "setting": ["a", "b", "c"],
                           "mean": [91.254, 93.5, 40.0], "std": [0.5, math.nan, 2.125], "n": [2, 1, 3]})
    figure = figures.mean_chart(points, "Final top-1 per setting", "final-epoch test top-1 (%)")
    axis = figure.axes[0]
    # top to bottom in the frame's order: the first row at the highest position
    assert sideways_error_bars(axis) == [(SGD, "o", [(91.254, 2.0)], [0.5]),
                                         (FSAM, "o", [(93.5, 1.0)], [0.0]),  # one seed: no spread
                                         ("black", "o", [(40.0, 0.0)], [2.125])]
    assert {tick: label.get_text() for tick, label in zip(axis.get_yticks(), axis.get_yticklabels())} == {
        2: "CIFAR-10 / r18 / SGD: 91.25 ± 0.50 (n=2)", 1: "CIFAR-10 / r18 / F-SAM (λ 0.3): 93.50 (n=1)",
        0: "x / newmethod: 40.00 ± 2.12 (n=3)"}
    assert axis.get_xlabel() == "final-epoch test top-1 (%)"
    assert figure.get_suptitle() == ("Final top-1 per setting\nmean over seeds, bars ± 1 sample standard deviation "
                                     "(n − 1)")
    plt.close(figure)


def test_log_tables_defaults_to_a_run_named_tables_here_in_the_environments_mode(tmp_path, monkeypatch):
    import wandb

    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # wandb's service resolves a relative folder from its own working folder: start it here
    log_tables({"t": pd.DataFrame({"a": [1]})}, {}, project="p")
    assert read_run(offline_run(tmp_path))["run"].display_name == "tables"


def test_wandb_says_when_it_logs_offline_instead_and_how_to_upload(tmp_path, monkeypatch, capsys):
    import fsam.report.wandb_upload as wandb_upload

    asked = []
    monkeypatch.setattr(wandb_upload, "resolve_mode",
                        lambda mode: asked.append(mode) or ("offline", "not logged in (test)"))
    log_tables({}, {}, project="p", mode="online", folder=tmp_path)
    assert asked == ["online"]
    assert capsys.readouterr().err == (f"warning: wandb not logged in (test): logging offline to {tmp_path}/wandb; "
                                       f"upload later with `wandb sync {tmp_path}/wandb/offline-run-*`\n")
    assert offline_run(tmp_path).is_dir()


def test_plain_frames_have_their_row_labels_as_columns_and_text_cells_as_strings():
    frame = pd.DataFrame({"a": pd.Series(["x", None, 3], dtype=object), 2: [1.5, 2.5, 3.5]}).set_axis(
        pd.MultiIndex.from_tuples([("d", "m"), ("d", "n"), ("e", "m")], names=["ds", "model"]))
    flat = _plain(frame)
    assert list(flat.columns) == ["ds", "model", "a", "2"]
    assert flat.to_dict("list") == {"ds": ["d", "d", "e"], "model": ["m", "n", "m"], "a": ["x", "", "3"],
                                    "2": [1.5, 2.5, 3.5]}
    plain = pd.DataFrame({"a": pd.Series([None, "y"], dtype=object), "n": [1, 2]})
    flat = _plain(plain)
    assert flat.to_dict("list") == {"a": ["", "y"], "n": [1, 2]}
    assert plain["a"].iloc[0] is None  # the caller's frame is left as it was


def test_backfill_logs_each_finished_run_as_the_run_it_was_and_skips_the_others(tmp_path, capsys):
    root = tmp_path / "runs"
    unfinished = write_run(root, "a-unfinished/seed1", state="unfinished")
    first = write_run(root, "b-sgd/seed1", top1=[88.0, 90.0], summary={"wandb_id": "abc123", "nothing": None})
    second = write_run(root, "b-sgd/seed2", seed=2, top1=[91.0, 92.0])
    no_config = root / "c-no-config"
    no_config.mkdir()
    (no_config / "summary.json").write_text(json.dumps({"best_top1": 1.0}))
    unidentified = write_run(root, "d-old/seed1")
    (unidentified / "config.yaml").write_text((unidentified / "config.yaml").read_text().replace(
        "  name: sgd\n", "  name: lookahead\n"))
    edited = write_run(root, "e-edited/seed1")
    edit_yaml(edited / "config.yaml", lambda record: record["optimizer"].update(lr=0.5))
    logged = backfill([unfinished, first, no_config, unidentified, edited, second], project="proj", entity="ent")
    assert logged == [str(first), str(second)]
    assert capsys.readouterr().err.splitlines() == [
        *(f"skipped: {path} is not a finished run folder" for path in (unfinished, no_config, unidentified)),
        f"skipped: {edited} is damaged: {RunFolder(edited).problem()}"]
    assert "config.yaml computes setting" in RunFolder(edited).problem()
    for skipped in (unfinished, no_config, unidentified, edited):
        assert not (skipped / "wandb").exists()
    setting = json.loads((first / "summary.json").read_text())["setting"]
    record = read_run(offline_run(first))
    run = record["run"]
    assert (run.run_id, run.display_name, run.run_group) == ("abc123", f"{setting}-seed1", setting)
    assert (run.project, run.entity, run.job_type, run.resume) == ("proj", "ent", "train", True)
    assert record["config"]["identity"]["setting"] == setting and record["config"]["identity"]["seed"] == 1
    assert record["config"]["optimizer"]["name"] == "sgd" and record["config"]["trainer"]["epochs"] == 2
    epochs = [row for row in record["history"] if "test/top1" in row]
    assert [(row["_step"], row["epoch"], row["test/top1"], row["train/epoch_loss"]) for row in epochs] == [
        (10, 1, 88.0, 2.0), (20, 2, 90.0, 1.0)]
    assert record["summary"]["best_top1"] == 90.0 and record["summary"]["final_top1"] == 90.0
    assert "nothing" not in record["summary"]  # empty values are not sent
    assert read_run(offline_run(second))["run"].display_name == f"{setting}-seed2"


def test_a_number_of_the_authors_release_applies_only_to_a_run_of_their_recipe():
    """The release's SAM number is compared with a run that has the release's initialisation and trains on each
    epoch's last batch, never with paper_cifar100_resnet18's own initialisation and dropped last batch."""
    known = load_known(Path(__file__).resolve().parents[1] / "results" / "known-results.csv")
    release = pd.Series({"dataset": "cifar100", "model": "resnet18", "optimizer": "sam", "rho": 0.2, "lmbda": None,
                         "sigma": None, "epochs": 200, "batch_size": 128, "init": "release", "last_batch": "kept"})
    assert published_value(known, release, "final_top1") == (80.78, "authors-release-log")
    for changed in ({"init": "ours"}, {"last_batch": "dropped"}, {"init": None}):
        assert published_value(known, pd.Series({**release, **changed}), "final_top1") is None, changed


# ------------------------------------------------------------------------------------------------ sharpness


@pytest.fixture
def measured(tmp_path):
    """F-SAM with three seeds, two measured on 128 images (λ_max 10 and 14) and one on 256 (λ_max 100); SGD with one
    seed measured, one not; every measured run with a trace, ρ-sharpness and a 1-D slice; a SAM run whose summary
    is gone (unfinished again) with a record left from before. Every best epoch is the first, never the final."""
    root = tmp_path / "runs"
    for seed, lam, images, losses in ((1, 10.0, 128, [1.0, 0.0, 1.0]), (2, 14.0, 128, [3.0, 0.0, 3.0]),
                                      (3, 100.0, 256, [9.0, 0.0, 9.0])):
        folder = write_run(root, f"fsam/seed{seed}", method="fsam", seed=seed, top1=[75.0, 70.0 + seed])
        write_sharpness(folder, lambda_max=lam, trace=10 * lam, rho={"plain": [(0.1, lam / 100, lam / 1000)]},
                        slice_losses=losses, images=images)
    sgd = write_run(root, "sgd/seed1", top1=[70.0, 65.0])
    write_sharpness(sgd, lambda_max=50.0, trace=500.0, rho={"plain": [(0.1, 0.5, 0.05)],
                                                            "adaptive": [(1.0, 2.0, 0.2)]}, slice_losses=[4.0, 1.0, 5.0])
    write_run(root, "sgd/seed2", seed=2, top1=[70.0, 66.0])
    write_sharpness(write_run(root, "sam/seed1", method="sam", state="unfinished"), lambda_max=3.0,
                    slice_losses=[5.0, 5.0, 5.0])
    return root


def test_a_finished_run_brings_its_sharpness_numbers_with_the_options_they_were_measured_with(measured):
    runs = load_runs(measured).set_index("seed")
    fsam = runs[runs["optimizer"] == "fsam"]
    assert fsam.loc[1, "lambda_max"] == 10.0 and fsam.loc[1, "hessian_trace"] == 100.0
    assert fsam.loc[1, "rho_worst_plain_0.1"] == 0.1 and fsam.loc[1, "rho_average_plain_0.1"] == 0.01
    options = json.loads(fsam.loc[3, "lambda_max_options"])
    assert (options["images"], options["power_iterations"]) == (256, 20)
    # a radius's options leave out the other radii measured with it: they do not change its numbers
    assert "rho" not in json.loads(fsam.loc[1, "rho_worst_plain_0.1_options"])
    sgd = runs[runs["optimizer"] == "sgd"]
    assert sgd.loc[1, "rho_worst_adaptive_1"] == 2.0 and math.isnan(sgd.loc[2, "lambda_max"])


def test_sharpness_averages_only_the_runs_of_a_setting_measured_with_identical_options(measured):
    summary = summarise(load_runs(measured)).set_index("optimizer")
    fsam = summary.loc["fsam"]
    # seeds 1 and 2 (128 images) are averaged; seed 3 (256 images) is counted beside them, never mixed in
    assert (fsam["lambda_max_mean"], fsam["lambda_max_std"], fsam["lambda_max_n"], fsam["lambda_max_left_out"]) == (
        12.0, pytest.approx(8 ** 0.5), 2, 1)
    assert json.loads(fsam["lambda_max_options"])["images"] == 128
    assert fsam["n"] == 3  # accuracy is averaged over every finished seed
    sgd = summary.loc["sgd"]
    assert (sgd["lambda_max_mean"], sgd["lambda_max_n"], sgd["lambda_max_left_out"]) == (50.0, 1, 0)
    assert math.isnan(sgd["lambda_max_std"]) and math.isnan(fsam["rho_worst_adaptive_1_mean"])
    assert fsam["rho_worst_adaptive_1_n"] == 0
    table = settings_table(summarise(load_runs(measured))).set_index("optimizer")
    assert table.loc["fsam", "λ_max (top Hessian eigenvalue)"] == "12 ± 2.8 (n=2; 1 measured with other options)"
    assert table.loc["sgd", "λ_max (top Hessian eigenvalue)"] == "50 (n=1)"
    assert table.loc["fsam", "worst-case ρ-sharpness (adaptive, ρ=1)"] == "—"
    assert table.loc["sgd", "average-case ρ-sharpness (plain, ρ=0.1)"] == "0.05 (n=1)"


def test_sharpness_columns_come_lambda_max_trace_then_rho_by_geometry_radius_and_case():
    columns = ["rho_average_adaptive_0.5_mean", "final_top1_mean", "rho_worst_plain_0.2", "hessian_trace_mean",
               "rho_average_plain_0.05", "rho_worst_plain_0.05", "lambda_max", "rho_worst_adaptive_0.5_options"]
    assert sharpness_metrics(columns) == ["lambda_max", "hessian_trace", "rho_worst_plain_0.05",
                                          "rho_average_plain_0.05", "rho_worst_plain_0.2", "rho_average_adaptive_0.5"]
    assert sharpness_metrics(["final_top1_mean", "lambda_max_options"]) == []


@pytest.mark.parametrize("cell", [(math.nan, math.nan, 0, 0, "—"), (math.nan, math.nan, 0, 2, "— (2 measured with "
                                                                                             "other options)"),
                                  (0.000123456, math.nan, 1, 0, "0.0001235 (n=1)"),
                                  (1234.5678, 12.345, 3, 0, "1235 ± 12 (n=3)")])
def test_a_sharpness_cell_has_four_significant_digits_its_own_n_and_the_runs_left_out(cell):
    *numbers, text = cell
    assert format_sharpness(*numbers) == text


def test_make_tables_writes_sharpness_as_numbers_and_says_how_it_was_measured(measured, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "tables"
    assert run_script(monkeypatch, "make_tables", measured, "--out-dir", out) == 0
    settings = pd.read_csv(out / "settings.csv")
    for metric in ("lambda_max", "hessian_trace", "rho_worst_plain_0.1", "rho_average_plain_0.1"):
        assert all(pd.api.types.is_numeric_dtype(settings[f"{metric}_{part}"]) for part in ("mean", "std", "n"))
    caption = (out / "settings.md").read_text().split("\n")[0]
    assert ("λ_max: the largest Hessian eigenvalue by power iteration (at most 20 Hessian-vector products, stopping "
            "at a relative change below 0.001).") in caption
    assert "Hessian trace: Hutchinson's estimate over 10 Rademacher probes." in caption
    assert "eval mode (BatchNorm with its running statistics), float32, the cross-entropy without weight decay" in caption
    assert "correlates weakly with generalisation across settings (Andriushchenko et al., ICML 2023)" in caption
    # F-SAM's cell averages 128 images, SGD's too: one set of images for the whole table
    assert caption.endswith("All on the final weights and 128 training images (image seed 0) with the labels the "
                            "runs trained on, in batches of 64.")
    assert "λ_max (top Hessian eigenvalue)" in (out / "settings.md").read_text()
    assert "Sharpness columns (scripts/sharpness.py; docs/sharpness.md)" in (out / "tables.md").read_text()


def test_the_caption_says_when_settings_were_measured_with_different_options(tmp_path):
    root = tmp_path / "runs"
    write_sharpness(write_run(root, "sgd/seed1"), lambda_max=1.0, images=128)
    write_sharpness(write_run(root, "fsam/seed1", method="fsam"), lambda_max=2.0, images=512, labels="clean")
    caption = sharpness_caption(summarise(load_runs(root)))
    assert ("λ_max: measured with 2 different sets of options in different settings; settings.csv gives each cell's "
            "(the <metric>_options columns).") in caption
    assert "All on" not in caption


def test_the_caption_names_the_images_of_each_quantity_where_they_differ(tmp_path):
    root = tmp_path / "runs"
    folder = write_run(root, "sgd/seed1")
    write_sharpness(folder, trace=3.0, images=256)
    trace_record = json.loads((folder / "analysis" / "sharpness.json").read_text())["measurements"]["trace"]
    write_sharpness(folder, lambda_max=1.0, images=128)
    record = json.loads((folder / "analysis" / "sharpness.json").read_text())
    record["measurements"]["trace"] = trace_record  # λ_max on 128 images, the trace on 256
    (folder / "analysis" / "sharpness.json").write_text(json.dumps(record))
    caption = sharpness_caption(summarise(load_runs(root)))
    assert ("relative change below 0.001), on the final weights and 128 training images (image seed 0) with the "
            "labels the runs trained on, in batches of 64.") in caption
    assert ("Hessian trace: Hutchinson's estimate over 10 Rademacher probes, on the final weights and 256 training "
            "images (image seed 0) with the labels the runs trained on, in batches of 64.") in caption
    assert "All on" not in caption


def test_a_table_without_sharpness_has_no_sharpness_columns(one_panel):
    summary = summarise(one_panel)
    assert sharpness_metrics(summary.columns) == []
    assert not [column for column in settings_table(summary) if "λ_max" in column or "ρ" in column]


def test_the_slice_figure_draws_each_methods_mean_loss_with_a_band_of_one_std_in_its_colour(measured, drawn,
                                                                                            tmp_path):
    written, notes = figures.loss_slices(load_runs(measured), tmp_path)
    (figure,) = drawn
    assert figure.stem == "slice1d_CIFAR-10_resnet18"
    assert written == [tmp_path / "slice1d_CIFAR-10_resnet18.png", tmp_path / "slice1d_CIFAR-10_resnet18.pdf"]
    (axis,) = figure.figure.axes
    # SGD first (method order); F-SAM: seeds 1 and 2, [1, 0, 1] and [3, 0, 3]; seed 3 measured on other images
    assert [points(line) for line in axis.lines] == [[(-1.0, 4.0), (0.0, 1.0), (1.0, 5.0)],
                                                     [(-1.0, 2.0), (0.0, 0.0), (1.0, 2.0)]]
    assert [line.get_color() for line in axis.lines] == [SGD, FSAM]
    assert legend(axis) == ["SGD, n=1", "F-SAM, n=2"]
    (fsam_band,) = axis.collections  # SGD has one measured seed: no band
    assert tuple(fsam_band.get_facecolor()[0]) == pytest.approx(to_rgba(FSAM, 0.18))
    assert band(fsam_band) == {-1.0: (round(2 - 2 ** 0.5, 6), round(2 + 2 ** 0.5, 6)), 0.0: (0.0, 0.0),
                               1.0: (round(2 - 2 ** 0.5, 6), round(2 + 2 ** 0.5, 6))}
    assert axis.get_xlabel() == "α: step along the direction, in units of each filter's own norm"
    assert axis.get_title().startswith("CIFAR-10, resnet18: loss along a filter-normalised random direction")
    assert notes == [f"slices: left out {measured / 'fsam' / 'seed3'} (its slice was measured with other options than "
                     "its setting's other seeds)"]


def test_accuracy_against_lambda_max_is_one_point_per_run_in_its_methods_colour(measured, drawn, tmp_path):
    written, notes = figures.accuracy_against_lambda_max(load_runs(measured), tmp_path)
    (figure,) = drawn
    assert figure.stem == "accuracy_vs_lambda_max_CIFAR-10_resnet18"
    (axis,) = figure.figure.axes
    sgd, fsam = axis.collections
    assert sgd.get_offsets().tolist() == [[50.0, 65.0]]
    assert sorted(fsam.get_offsets().tolist()) == [[10.0, 71.0], [14.0, 72.0]]  # final-epoch top-1 of seeds 1, 2
    assert tuple(sgd.get_facecolor()[0]) == pytest.approx(to_rgba(SGD)) and tuple(
        fsam.get_facecolor()[0]) == pytest.approx(to_rgba(FSAM))
    assert legend(axis) == ["SGD, n=1", "F-SAM, n=2"]
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("λ_max: top eigenvalue of the training loss's Hessian",
                                                      FINAL)
    assert notes == [f"accuracy against λ_max: left out {measured / 'fsam' / 'seed3'} (λ_max measured with other "
                     "options than the other runs of its panel)"]


def test_runs_without_sharpness_draw_no_sharpness_figure(one_panel, drawn, tmp_path):
    assert figures.loss_slices(one_panel, tmp_path) == ([], [])
    assert figures.accuracy_against_lambda_max(one_panel, tmp_path) == ([], [])
    assert drawn == []


def test_plot_draws_the_sharpness_figures_of_measured_runs_and_says_why_not_otherwise(measured, tmp_path,
                                                                                      monkeypatch, capsys):
    assert run_script(monkeypatch, "plot", measured, "--out-dir", tmp_path / "figures") == 0
    printed = capsys.readouterr().out
    assert f"written (loss along a random direction): {tmp_path / 'figures' / 'slice1d_CIFAR-10_resnet18.png'}" in printed
    assert "written (accuracy against λ_max): " in printed
    bare = tmp_path / "bare"
    write_run(bare, "sgd/seed1")
    assert run_script(monkeypatch, "plot", bare, "--out-dir", tmp_path / "other") == 0
    printed = capsys.readouterr().out
    assert ("not drawn (loss along a random direction): needs finished runs measured with scripts/sharpness.py "
            "--what slice1d") in printed
    assert "not drawn (accuracy against λ_max): needs finished runs measured with scripts/sharpness.py --what eigen" \
        in printed
