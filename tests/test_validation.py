"""Honest tuning: a validation split held out of training, the last partial batch, and Hydra's Optuna sweeper."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import metrics_of
from fsam.data import build_data
from fsam.data.specs import NoiseSpec
from fsam.engine import run
from fsam.errors import ConfigError
from fsam.runfolder import run_key


def rows(images: torch.Tensor) -> list[bytes]:
    """Each image of a uint8 [N, 3, H, W] tensor as bytes, to compare sets of images."""
    return [image.numpy().tobytes() for image in images.cpu()]


def digits(**kwargs):
    return build_data("digits", "unused", batch_size=32, download=False, num_workers=0, **kwargs)


def test_validation_split_is_held_out_of_training_and_fixed_by_its_own_seed():
    whole = digits()
    split = digits(val_split=300, val_seed=0)
    train, val = rows(split.train.images), rows(split.val.images)
    assert len(val) == 300 and len(train) == len(rows(whole.train.images)) - 300
    # Together they are the training split, each image once: nothing is both trained on and validated on.
    assert sorted(train + val) == sorted(rows(whole.train.images))
    assert split.info["num_train"] == len(train) and split.info["num_val"] == 300
    # The training seed (order, augmentation, label noise) never changes which images are held out ...
    assert rows(digits(val_split=300, val_seed=0, seed=7).val.images) == val
    # ... its own seed does.
    assert rows(digits(val_split=300, val_seed=1).val.images) != val
    # Validation is evaluation: its batches are the held-out images, normalised, not augmented, in order.
    first = next(split.val.iterate(0))[0]
    assert torch.equal(first, next(split.val.iterate(5))[0])


def test_validation_labels_are_clean_and_label_noise_changes_only_the_training_examples():
    clean = digits(val_split=300)
    noisy = digits(val_split=300, noise=NoiseSpec(kind="symmetric", ratio=0.6, seed=0))
    assert rows(noisy.val.images) == rows(clean.val.images)
    assert torch.equal(noisy.val.labels, clean.val.labels)
    assert rows(noisy.train.images) == rows(clean.train.images)
    changed = (noisy.train.labels != clean.train.labels).float().mean().item()
    assert 0.4 < changed < 0.7  # symmetric 60 %: a changed label is never the true one


@pytest.mark.parametrize("val_split", [-1, 1437, True])
def test_a_validation_split_that_leaves_nothing_to_train_on_is_refused(val_split):
    with pytest.raises(ConfigError, match="dataset.val_split"):
        digits(val_split=val_split)


def test_the_last_partial_batch_is_dropped_by_default_and_trained_on_when_asked(cifar_root):
    def train_batches(**kwargs):
        data = build_data("cifar10", str(cifar_root), batch_size=24, download=False, num_workers=0, **kwargs)
        return [len(targets) for _, targets in data.train.iterate(0)], len(data.train)

    assert train_batches() == ([24, 24], 2)  # 64 images: 16 left out of the epoch
    assert train_batches(drop_last=False) == ([24, 24, 16], 3)  # every image once, as the authors' release does
    # Two processes: each its own 32 images, the last 8 of them a batch of their own.
    data = build_data("cifar10", str(cifar_root), batch_size=12, download=False, num_workers=0, rank=1,
                      world_size=2, drop_last=False)
    assert [len(t) for _, t in data.train.iterate(0)] == [12, 12, 8] and len(data.train) == 3
    with pytest.raises(ConfigError, match="last batch of 1 example"):
        build_data("cifar10", str(cifar_root), batch_size=21, download=False, num_workers=0, drop_last=False)


def test_a_run_with_drop_last_false_takes_every_batch_and_ends_its_schedule_at_zero(tiny_config):
    config = tiny_config(trainer={"batch_size": 24}, dataset={"drop_last": False})
    summary = run(config)
    assert summary["global_steps"] == 2 * 3
    assert [row["lr"] for row in metrics_of(config["run_dir"])][-1] == pytest.approx(0.0, abs=1e-12)


def test_a_run_reports_validation_beside_test_and_the_summary_picks_the_epoch_by_validation(tmp_path):
    config = {
        "run_dir": str(tmp_path / "run"),
        "dataset": {"name": "digits", "train_subset": 600, "val_split": 200, "num_workers": 0},
        "model": {"name": "pyramidnet110", "kwargs": {"depth": 8, "alpha": 4, "bottleneck": False}},
        "optimizer": {"name": "fsam", "lr": 0.1},
        "trainer": {"epochs": 3, "batch_size": 64, "device": "cpu", "amp": "off", "seed": 1},
    }
    summary = run(config)
    records = metrics_of(config["run_dir"])
    assert all({"val_loss", "val_top1", "val_top5"} <= set(row) for row in records)
    chosen = max(records, key=lambda row: row["val_top1"])
    assert summary["best_val_top1"] == chosen["val_top1"]
    assert summary["best_val_epoch"] == chosen["epoch"]
    assert summary["test_top1_at_best_val"] == chosen["test_top1"]
    assert summary["data"]["num_val"] == 200 and summary["data"]["num_train"] == 600 - 200
    # 200 images: every score is a multiple of 0.5 %.
    assert all(math.isclose(row["val_top1"] * 2, round(row["val_top1"] * 2)) for row in records)


def test_the_validation_options_are_part_of_the_setting_only_when_they_change_something(tiny_config):
    def key(config):
        return run_key(config, 1)

    base = tiny_config()
    assert key(tiny_config(dataset={"val_split": 0, "val_seed": 5})) == key(base)
    assert key(tiny_config(dataset={"drop_last": True})) == key(base)
    held = key(tiny_config(dataset={"val_split": 16}))
    assert held != key(base)
    assert key(tiny_config(dataset={"val_split": 16, "val_seed": 1})) != held
    assert key(tiny_config(dataset={"drop_last": False})) != key(base)


def test_tables_choose_by_validation_only_where_runs_have_a_validation_split():
    import pandas as pd

    from fsam.report.tables import reported_metrics, settings_table, summarise

    def runs(with_val: bool) -> pd.DataFrame:
        frame = pd.DataFrame({
            "setting": ["a", "a"], "status": ["finished"] * 2, "dataset": ["digits"] * 2, "optimizer": ["sgd"] * 2,
            "model": ["m"] * 2, "best_top1": [90.0, 92.0], "final_top1": [89.0, 91.0],
        })
        if with_val:
            frame["test_top1_at_best_val"] = [88.0, 90.0]
        return frame

    summary = summarise(runs(True))
    assert reported_metrics(summary) == ["final_top1", "test_top1_at_best_val", "best_top1"]
    assert summary.loc[0, "test_top1_at_best_val_mean"] == 89.0
    assert "test top-1 at the best validation epoch (%)" in settings_table(summary)
    assert reported_metrics(summarise(runs(False))) == ["final_top1", "best_top1"]


def test_optuna_searches_on_validation_and_its_best_value_is_a_runs_best_validation_top1(train_py, isolated_records):
    result = train_py(
        "-m", "experiment=tune_digits", "hydra.sweeper.n_trials=2", "trainer.epochs=1", "dataset.train_subset=500",
        "dataset.val_split=100", f"hydra.sweep.dir={isolated_records / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(path.read_text()) for path in Path(isolated_records).rglob("summary.json")]
    assert len(summaries) == 2 and all(s["data"]["num_val"] == 100 for s in summaries)
    found = yaml.safe_load((isolated_records / "sweep" / "optimization_results.yaml").read_text())
    assert found["best_value"] == max(s["best_val_top1"] for s in summaries)
    assert set(found["best_params"]) == {"optimizer.rho", "optimizer.lmbda", "optimizer.sigma"}


def test_optuna_without_a_validation_split_is_refused_before_training(train_py, isolated_records):
    result = train_py("-m", "experiment=tune_digits", "hydra.sweeper.n_trials=1", "dataset.val_split=0")
    assert result.returncode == 2
    assert "has no validation split: add dataset.val_split=N" in result.stderr
    assert not list(Path(isolated_records).rglob("metrics.jsonl"))


def test_hold_out_keeps_each_parts_order():
    from fsam.data.factory import _hold_out

    examples = np.arange(20)
    (kept, kept_labels), (val, val_labels) = _hold_out(examples, examples * 10, 5, 3)
    assert list(kept) == sorted(kept) and list(val) == sorted(val)
    assert sorted([*kept, *val]) == list(range(20)) and list(val_labels) == list(val * 10)
    paths = [f"{i}.jpg" for i in range(20)]
    (kept_paths, _), (val_paths, _) = _hold_out(paths, examples, 5, 3)
    assert val_paths == [f"{i}.jpg" for i in val]


def test_a_search_reports_each_trial_it_cannot_run_and_goes_on(train_py, isolated_records, tmp_path):
    """Trials an adaptive sweeper chooses are checked as they come: a refused one is reported and the search goes
    on to its next trial; the search then exits with status 2, naming them."""
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "bad_search.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tune_digits\n  - _self_\n"
        "hydra:\n  sweeper:\n    params:\n      optimizer.lmbda: choice(1.5)\n")
    result = train_py("-m", "-cd", str(tmp_path / "configs"), "experiment=bad_search", "hydra.sweeper.n_trials=2",
                      f"hydra.sweep.dir={isolated_records / 'sweep'}")
    assert result.returncode == 2
    refused = [line for line in result.stdout.splitlines() if line.startswith("job #")]
    assert [line.split(") ", 1)[1].split(":")[0] for line in refused] == ["refused", "refused"]
    assert "optimizer.lmbda=1.5 is not allowed: must be in [0, 1)" in refused[1]
    assert refused[1].endswith("sweep: 2 of 2 jobs done (2 refused), " + refused[1].rsplit(", ", 1)[1])
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trial of this search finished: job #0 (")
    assert not list(Path(isolated_records).rglob("metrics.jsonl"))
