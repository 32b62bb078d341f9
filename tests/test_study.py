"""A comparison fixed before it is run (fsam/study.py): equal trials per method, choice on validation only, paired
differences with their interval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fsam.errors import FsamError
from fsam.study import DIGITS_NOISE, Dimension, Study, choices, heatmap_blocks, paired_difference, seed_blocks
from reportgen import write_run

SMALL = Study(
    name="small", base=("experiment=digits_noise",),
    conditions={"clean": ("dataset.noise.kind=none",), "sym40": ("dataset.noise.kind=symmetric",
                                                                 "dataset.noise.ratio=0.4")},
    search={"sgd": (Dimension("optimizer.lr", 0.01, 0.3),),
            "fsam": (Dimension("optimizer.lr", 0.01, 0.3), Dimension("optimizer.lmbda", 0.0, 0.9, log=False),
                     Dimension("optimizer.sigma", 0.5, 2.0, log=False))},
    trials=4, trial_seed=7, seeds=5, select="final_val_top1", heatmap_condition="sym40",
    heatmap={"optimizer.lmbda": (0.0, 0.6), "optimizer.sigma": (1.0, 2.0)},
)


def test_every_method_gets_the_same_number_of_trials_inside_its_search_space():
    for study in (DIGITS_NOISE, SMALL):
        for method, dimensions in study.search.items():
            trials = study.trial_overrides(method)
            assert len(trials) == study.trials
            for trial in trials:
                assert [item.split("=")[0] for item in trial] == [dimension.key for dimension in dimensions]
                for item, dimension in zip(trial, dimensions):
                    assert dimension.low <= float(item.split("=")[1]) <= dimension.high
    assert len(DIGITS_NOISE.tuning_cells()) == 16 * 3 * 5


def test_the_trials_are_a_stated_list_the_same_on_every_machine():
    """The protocol's runs are named by these values: a changed sequence would orphan every tuning run."""
    assert DIGITS_NOISE.trial_overrides("sgd")[:2] == [["optimizer.lr=0.121", "optimizer.weight_decay=7.03e-05"],
                                                       ["optimizer.lr=0.0266", "optimizer.weight_decay=0.00386"]]
    assert DIGITS_NOISE.trial_overrides("fsam")[1] == ["optimizer.lr=0.0178", "optimizer.weight_decay=0.00632",
                                                       "optimizer.rho=1.96", "optimizer.lmbda=0.05",
                                                       "optimizer.sigma=0.75"]
    assert DIGITS_NOISE.trial_overrides("sam") == DIGITS_NOISE.trial_overrides("sam")


def test_a_dimension_maps_the_unit_interval_onto_its_range_in_three_digits():
    assert Dimension("k", 0.01, 1.0).value(0.5) == 0.1
    assert Dimension("k", 0.5, 2.0, log=False).value(0.25) == 0.875
    assert Dimension("k", 1e-5, 1e-2).value(0.0) == 1e-5


def tuned(root: Path, values: dict[tuple[str, str], list[float | None]]):
    """Tuning runs of SMALL written by hand, their final validation top-1 given per (condition, method) and trial
    (None: not finished); returns the compose function that maps each tuning cell to its folder."""
    folders = {}
    for (condition, method, overrides) in SMALL.tuning_cells():
        key = (condition, method)
        index = sum(1 for other in folders if other[:2] == key)
        value = values[key][index]
        name = f"{condition}-{method}-{index}"
        folder = write_run(root, name, method=method, state="finished" if value is not None else "unfinished",
                           summary={"final_val_top1": value} if value is not None else None)
        folders[(condition, method, index)] = folder

    def compose_runs(cells):
        assert all(cell[-1] == "trainer.seed=1" for cell in cells)  # tuning runs are seed 1
        return [(folder, {}) for folder in folders.values()]

    return compose_runs


def test_each_method_is_chosen_by_its_best_validation_value_the_first_of_equal_ones(tmp_path):
    compose = tuned(tmp_path, {("clean", "sgd"): [50, 70, 70, 60], ("clean", "fsam"): [80, 20, 30, 40],
                               ("sym40", "sgd"): [1, 2, 3, 4], ("sym40", "fsam"): [9, 9, 9, 10]})
    chosen = choices(SMALL, compose)
    assert chosen[("clean", "sgd")].value == 70 and chosen[("clean", "sgd")].overrides[-1] == \
        SMALL.trial_overrides("sgd")[1][-1]
    assert chosen[("clean", "fsam")].overrides == [*SMALL.method_cell("clean", "fsam"), *SMALL.trial_overrides("fsam")[0]]
    assert chosen[("sym40", "fsam")].value == 10
    blocks = seed_blocks(SMALL, compose)
    assert blocks == [chosen[(c, m)].overrides for c in SMALL.conditions for m in SMALL.search]
    base = [*SMALL.method_cell("sym40", "fsam"), SMALL.trial_overrides("fsam")[3][0]]  # with its choice's lr
    assert heatmap_blocks(SMALL, compose) == [[*base, "optimizer.lmbda=0", "optimizer.sigma=1,2"],
                                              [*base, "optimizer.lmbda=0.6", "optimizer.sigma=1,2"]]


def test_the_seed_stage_waits_for_every_tuning_run(tmp_path):
    compose = tuned(tmp_path, {("clean", "sgd"): [50, None, 70, 60], ("clean", "fsam"): [1, 2, 3, 4],
                               ("sym40", "sgd"): [1, 2, 3, 4], ("sym40", "fsam"): [1, 2, 3, 4]})
    with pytest.raises(FsamError, match=r"1 of 16 tuning runs of small are not finished .*: run python "
                                        r"scripts/reproduce.py --grid small_tune --seeds 1 first"):
        seed_blocks(SMALL, compose)


def test_a_paired_difference_is_the_mean_over_shared_seeds_with_its_t_interval():
    difference = paired_difference({1: 1.0, 2: 2.0, 3: 3.0, 9: 50.0}, {1: 0.0, 2: 0.5, 3: 1.0})
    assert difference.n == 3 and difference.mean == pytest.approx(1.5)
    half = 4.302652729911275 * 0.5 / math.sqrt(3)  # t(0.975, 2) x sample std 0.5 / sqrt(3)
    assert (difference.low, difference.high) == (pytest.approx(1.5 - half), pytest.approx(1.5 + half))
    assert not difference.no_difference and difference.text().endswith("(n=3): higher")
    noisy = paired_difference({1: 1.0, 2: -1.0, 3: 0.5}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert noisy.no_difference and noisy.text().endswith(": no difference")
    single = paired_difference({1: 2.0}, {1: 1.0})
    assert single.n == 1 and math.isnan(single.low) and single.text() == "+1.00 (n=1, no interval)"


def test_every_tuning_trial_is_a_setting_of_its_own():
    """Trials that rounded to the same values would be one run counted twice in the budget."""
    for study in (DIGITS_NOISE, SMALL):
        for method in study.search:
            trials = [tuple(trial) for trial in study.trial_overrides(method)]
            assert len(set(trials)) == len(trials), (study.name, method)
