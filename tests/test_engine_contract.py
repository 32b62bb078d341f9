"""The engine's contract, stated exactly and checked fast (the tests mutation testing runs for every mutant).

Runs here train a linear classifier (``TinyNet``, put in place of ``create_model``) on 40 CIFAR-format images in
batches of 16, so an epoch is 3 steps of 16, 16 and 8 examples, and a whole ``run()`` takes a few hundredths of a
second. The model is irrelevant to what is checked: the records a run writes, what it prints, checkpoints and
resuming, stopping, and the helpers of every engine module, with expected values worked out by hand.
"""

from __future__ import annotations

import json
import math
import os
import signal
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import random
import torch
from torch import nn
from torch.nn import functional as F

import fsam.engine.loop as loop
from conftest import merge, metrics_of, stop_at_call, without_times
from inject import ReadOnlyFileSystem
from fsam.config import ScheduleConfig, load_config
from fsam.engine import distributed, preemption, run
from fsam.engine.checkpoint import CheckpointStore, _as_tuples, _os_error_in, capture_rng, restore_rng
from fsam.engine.evaluate import evaluate, topk_correct
from fsam.engine.loop import EpochTotals, _chosen_by_validation, precision_mode, refuse_other_run
from fsam.engine.preemption import StopSignals, signal_name
from fsam.engine.schedule import create_schedule, lr_factor
from fsam.engine.wandb_mirror import WandbMirror, new_run_id
from fsam.errors import CheckpointError, ConfigError, DataError, DivergedError, FsamError, Interrupted
from fsam.optim import Precision
from fsam.runfolder import RunFolder, RunFolderError, default_run_dir
from fsam.wandbio import epoch_record

LR = 0.01
SIZES = [16, 16, 8]  # one epoch: 40 training images in batches of 16, the last one partial
STEPS = len(SIZES)
PARAMETERS = 3 * 32 * 32 * 10 + 10  # TinyNet on CIFAR-10


class TinyNet(nn.Module):
    """A linear classifier of the flattened image, with optional dropout (which draws from torch's generator)."""

    def __init__(self, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(3 * 32 * 32, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(inputs.flatten(1)))


@pytest.fixture
def built(monkeypatch) -> list[dict]:
    """TinyNet in place of the engine's model factory; each build's arguments are appended to the list returned.
    A ``dropout`` entry in model.kwargs is the TinyNet's dropout."""
    calls: list[dict] = []

    def create(name, num_classes, **kwargs):
        calls.append({"name": name, "num_classes": num_classes, **kwargs})
        return TinyNet(num_classes, kwargs.get("dropout", 0.0))

    monkeypatch.setattr(loop, "create_model", create)
    return calls


@pytest.fixture
def small(tiny_config, built):
    """``small(**changes)``: a config of 2 epochs of 3 steps (16, 16, 8 examples) of SGD on TinyNet."""

    def make(**changes):
        base = tiny_config(
            model={"name": "pyramidnet110", "kwargs": {"depth": 8}},
            dataset={"train_subset": 40, "drop_last": False,
                     "augment": {"crop": False, "flip": False, "cutout": False}},
            optimizer={"name": "sgd", "lr": LR},
        )
        return merge(base, changes)

    return make


def record_steps(monkeypatch) -> list[dict]:
    """Wrap the loop's train_step; each call appends its arguments' essentials and what it returned."""
    real = loop.train_step
    steps: list[dict] = []

    def recording(model, inputs, targets, loss_fn, optimizer, **kwargs):
        lr = optimizer.param_groups[0]["lr"]
        out = real(model, inputs, targets, loss_fn, optimizer, **kwargs)
        steps.append({"lr": lr, "n": len(targets), "loss": out.loss.item(), "targets": targets.clone(),
                      "logits": out.logits.clone(), "kwargs": kwargs, "loss_fn": loss_fn})
        return out

    monkeypatch.setattr(loop, "train_step", recording)
    return steps


def checkpoint(run_dir, name: str = "last.pt") -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / name, weights_only=True)


def interrupt_at_call(monkeypatch, config: dict, call: int) -> None:
    """Start ``config`` and stop it with Ctrl-C (KeyboardInterrupt) at the ``call``-th training step."""
    with monkeypatch.context() as patch:
        stop_at_call(patch, call, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run(config)


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))


def output_lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


# ------------------------------------------------------------------------------------------- one whole run


def test_each_metrics_row_states_the_epoch_exactly(small, monkeypatch):
    steps = record_steps(monkeypatch)
    config = small()
    run(config)
    rows = metrics_of(config["run_dir"])

    assert [step["n"] for step in steps] == SIZES * 2
    assert [step["lr"] for step in steps] == pytest.approx([LR * cosine(s, 2 * STEPS) for s in range(2 * STEPS)])
    for epoch, row in enumerate(rows):
        assert set(row) == {"epoch", "step", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                            "lr", "images_per_s", "skipped_steps", "epoch_time_s", "wall_time_s"}
        epoch_steps = steps[epoch * STEPS: (epoch + 1) * STEPS]
        loss = sum(s["loss"] * s["n"] for s in epoch_steps) / 40
        correct = sum(int((s["logits"].argmax(1) == s["targets"]).sum()) for s in epoch_steps)
        assert (row["epoch"], row["step"], row["skipped_steps"]) == (epoch + 1, (epoch + 1) * STEPS, 0)
        assert row["train_loss"] == pytest.approx(loss, rel=1e-6)
        assert row["train_top1"] == pytest.approx(100.0 * correct / 40, abs=1e-9)
        assert row["lr"] == pytest.approx(LR * cosine((epoch + 1) * STEPS, 2 * STEPS), abs=1e-15)  # after the epoch
        assert row["epoch_time_s"] > 0
        assert row["images_per_s"] == pytest.approx(40 / row["epoch_time_s"], rel=1e-9)
    unweighted = sum(s["loss"] for s in steps[:STEPS]) / STEPS
    assert abs(unweighted - rows[0]["train_loss"]) > 1e-6, "the 8-example batch must weigh less"
    assert rows[0]["lr"] == pytest.approx(LR / 2) and rows[1]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert 0 < rows[0]["wall_time_s"] < rows[1]["wall_time_s"]
    assert rows[0]["epoch_time_s"] <= rows[0]["wall_time_s"]


def test_each_row_holds_what_evaluate_said_of_the_model_of_that_epoch(small, monkeypatch):
    real = loop.evaluate
    seen = []

    def recording(model, loader, precision, device, split="test"):
        result = real(model, loader, precision, device, split=split)
        seen.append((split, result, {k: v.clone() for k, v in model.state_dict().items()}))
        return result

    monkeypatch.setattr(loop, "evaluate", recording)
    config = small(dataset={"val_split": 8})
    summary = run(config)
    rows = metrics_of(config["run_dir"])
    assert [split for split, _, _ in seen] == ["test", "val", "test", "val"]
    for epoch, row in enumerate(rows):
        (_, test, weights), (_, val, _) = seen[2 * epoch], seen[2 * epoch + 1]
        assert {k: row[k] for k in test} == test and {k: row[k] for k in val} == val
        saved = checkpoint(config["run_dir"], "last.prev.pt" if epoch == 0 else "last.pt")
        assert all(torch.equal(weights[k], saved["model"][k]) for k in weights)
    best_val = max(rows, key=lambda row: row["val_top1"])
    assert summary["best_val_top1"] == best_val["val_top1"]
    assert summary["final_val_top1"] == rows[-1]["val_top1"]


def test_the_summary_states_the_run(small, capsys):
    config = small()
    started = time.perf_counter()
    summary = run(config)
    assert 0 < summary["wall_time_s"] <= time.perf_counter() - started
    rows = metrics_of(config["run_dir"])
    written = json.loads((Path(config["run_dir"]) / "summary.json").read_text())
    assert written == summary
    recorded = json.loads(json.dumps(summary))  # as the file has it
    assert recorded["status"] == "finished"
    assert (summary["final_top1"], summary["final_top5"]) == (rows[-1]["test_top1"], rows[-1]["test_top5"])
    assert (summary["final_test_loss"], summary["final_train_loss"]) == (rows[-1]["test_loss"],
                                                                           rows[-1]["train_loss"])
    best = max(rows, key=lambda row: row["test_top1"])  # the first of equal ones
    assert (summary["best_top1"], summary["best_epoch"]) == (best["test_top1"], best["epoch"])
    assert (summary["epochs"], summary["global_steps"], summary["skipped_steps"]) == (2, 6, 0)
    assert (summary["world_size"], summary["amp"], summary["device"], summary["seed"], summary["method"]) == (
        1, "off", "cpu", 1, "sgd")
    assert summary["run_dir"] == config["run_dir"]
    assert summary["train_time_s"] == pytest.approx(sum(row["epoch_time_s"] for row in rows))
    assert summary["images_per_s"] == pytest.approx(80 / summary["train_time_s"])
    assert summary["wall_time_s"] >= rows[-1]["wall_time_s"]
    assert summary["model"] == {"name": "pyramidnet110", "parameters": PARAMETERS,
                                "kwargs": {"depth": 8, "alpha": 270.0, "bottleneck": True, "init": "ours"},
                                "label": "pyramidnet8 (0.0307M parameters)"}
    assert summary["setting"].startswith("cifar10-pyramidnet8-sgd-")
    assert summary["setting_digest"].startswith(summary["setting"].rsplit("-", 1)[1])
    assert summary["wandb_id"] == checkpoint(config["run_dir"])["wandb_id"]
    assert "full_gradient_passes_per_step" not in summary and "best_val_top1" not in summary
    assert {"git_commit", "versions"} <= set(summary)


def test_a_run_prints_what_it_trains_each_epoch_and_the_end(small, capsys):
    config = small()
    summary = run(config)
    rows = metrics_of(config["run_dir"])
    lines = output_lines(capsys)
    assert lines[0] == (f"training sgd on cifar10 with pyramidnet8 (0.0307M parameters): 2 epochs of 3 steps on cpu "
                        f"(amp off); records in {config['run_dir']}")
    for line, row in zip(lines[1:3], rows):
        assert line == (
            f"epoch {row['epoch']}/2  train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}%  test loss "
            f"{row['test_loss']:.4f} top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}%  lr "
            f"{row['lr']:.4g}  {row['images_per_s']:.0f} img/s"
        )
    assert lines[3] == (f"finished: final test top-1 {summary['final_top1']:.2f}% (best test epoch, a diagnostic: "
                        f"{summary['best_top1']:.2f}% at epoch {summary['best_epoch']}) in {summary['wall_time_s']:.0f} s")
    assert lines[4] == f"records: {config['run_dir']} (config.yaml, metrics.jsonl, summary.json, checkpoints/)"
    assert len(lines) == 5


def test_the_validation_split_is_printed_in_each_epoch_line(small, capsys):
    config = small(dataset={"val_split": 8}, trainer={"epochs": 1})
    run(config)
    row = metrics_of(config["run_dir"])[0]
    assert f"top-5 {row['test_top5']:.2f}%  val top-1 {row['val_top1']:.2f}%  lr " in output_lines(capsys)[1]


def test_the_model_is_built_from_the_config_and_the_data(small, built):
    run(small(model={"name": "resnet18", "kwargs": {"num_classes": 10, "dropout": 0.0}}, trainer={"epochs": 1}))
    assert built == [{"name": "resnet18", "num_classes": 10, "image_size": 32, "pretrained_path": None,
                      "pretrained": False, "dropout": 0.0}]


def test_a_num_classes_that_does_not_fit_the_data_is_refused(small):
    with pytest.raises(DataError) as error:
        run(small(model={"name": "resnet18", "kwargs": {"num_classes": 7}}))
    assert str(error.value) == (
        "model.kwargs.num_classes=7 does not fit dataset cifar10, which has 10 classes: remove "
        "model.kwargs.num_classes (the head is sized from the data)"
    )


def test_the_data_is_built_from_the_config(small, monkeypatch):
    real = loop.build_data
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "build_data", recording)
    config = small(trainer={"epochs": 1, "seed": 3, "eval_batch_size": 32}, dataset={"noise": {"seed": None}})
    run(config)
    run(small(run_dir=config["run_dir"] + "-noise", trainer={"epochs": 1, "seed": 3},
              dataset={"noise": {"kind": "symmetric", "ratio": 0.2, "seed": 11}}))
    (args, kwargs), (_, noisy) = calls
    assert args == ("cifar10", config["dataset"]["root"])
    assert kwargs["noise"].seed == 3 and noisy["noise"].seed == 11  # null: the training seed's own noise
    assert noisy["noise"].kind == "symmetric" and noisy["noise"].ratio == 0.2
    assert {key: value for key, value in kwargs.items() if key not in ("noise", "augment")} == {
        "batch_size": 16, "eval_batch_size": 32, "device": torch.device("cpu"), "seed": 3, "download": False,
        "url": None, "md5": None, "image_size": 32, "num_workers": 0, "rank": 0, "world_size": 1,
        "channels_last": False, "train_subset": 40, "val_split": 0, "val_seed": 0, "drop_last": False,
    }
    assert kwargs["augment"] == loop.AugmentSpec(**loop.to_plain(load_config(config).dataset.augment))


def test_the_optimizer_and_each_step_get_the_configured_settings(small, monkeypatch):
    real = loop.create_optimizer
    calls = []

    def recording(model, name, **kwargs):
        calls.append((name, kwargs))
        return real(model, name, **kwargs)

    monkeypatch.setattr(loop, "create_optimizer", recording)
    steps = record_steps(monkeypatch)
    run(small(optimizer={"name": "sam", "rho": 0.1, "weight_decay": 0.0, "nesterov": True},
              trainer={"epochs": 1, "micro_batches": 2, "sync_clean_pass": True, "label_smoothing": 0.25}))
    name, kwargs = calls[0]
    assert name == "sam"
    assert kwargs == {"base": "sgd", "lr": LR, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0,
                      "betas": (0.9, 0.999), "rho": 0.1, "sigma": 1.0, "lmbda": 0.6, "eta": 0.0, "ema_order": "code",
                      "perturbation": "minibatch", "no_decay_norm_and_bias": kwargs["no_decay_norm_and_bias"]}
    assert kwargs["no_decay_norm_and_bias"] == load_config({}).optimizer.no_decay_norm_and_bias
    step = steps[0]
    assert step["kwargs"]["micro_batches"] == 2 and step["kwargs"]["sync_clean_pass"] is True
    assert step["kwargs"]["precision"].mode == "off"
    assert step["loss_fn"].label_smoothing == 0.25
    smoothed = F.cross_entropy(step["logits"], step["targets"], label_smoothing=0.25).item()
    assert step["loss"] == pytest.approx(smoothed, rel=1e-5)


def test_the_first_launch_records_where_it_started_and_the_config(small):
    config = small()
    run(config)
    launches = [json.loads(line) for line in (Path(config["run_dir"]) / "launches.jsonl").read_text().splitlines()]
    assert len(launches) == 1
    launch = launches[0]
    assert (launch["from_epoch"], launch["from_batch"], launch["from_step"], launch["processes"]) == (0, 0, 0, 1)
    assert launch["pid"] == os.getpid()
    assert {"host", "started", "command", "git_commit"} <= set(launch)
    recorded, identity = RunFolder(config["run_dir"]).read_config()
    assert recorded == loop.to_plain(load_config(config))
    assert identity["model"]["parameters"] == PARAMETERS


def test_without_run_dir_the_run_goes_to_the_default_folder(small):
    config = small(trainer={"epochs": 1})
    del config["run_dir"]
    summary = run(config)
    assert summary["run_dir"] == str(default_run_dir(load_config(config), 1))
    assert (Path(summary["run_dir"]) / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ the best


def test_the_best_epoch_is_the_first_with_the_highest_test_top1(small, monkeypatch):
    scripted = iter([50.0, 75.0, 75.0, 25.0])  # epochs 2 and 3 tie: the earlier one stays the best
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {**real(*a, **k), "test_top1": next(scripted)})
    config = small(trainer={"epochs": 4})
    summary = run(config)
    assert (summary["best_top1"], summary["best_epoch"], summary["final_top1"]) == (75.0, 2, 25.0)
    best, last = checkpoint(config["run_dir"], "best.pt"), checkpoint(config["run_dir"])
    assert (best["epoch"], best["global_step"], best["best_top1"], best["best_epoch"]) == (2, 6, 75.0, 2)
    assert (last["epoch"], last["global_step"], last["best_epoch"]) == (4, 12, 2)


# --------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_written_every_n_steps_inside_an_epoch_and_at_each_end(small, monkeypatch):
    real = loop._Trainer._save
    saves = []

    def recording(self, *, best=False):
        saves.append((self.progress.global_step, self.progress.epoch, self.progress.batch, best))
        return real(self, best=best)

    monkeypatch.setattr(loop._Trainer, "_save", recording)
    config = small(trainer={"checkpoint_every_steps": 2})
    run(config)
    # step 2 (batch 2 of 3), the end of epoch 1 (step 3), step 4 (batch 1 of epoch 2), the end of epoch 2 (step 6,
    # a multiple of 2 too, saved once)
    assert [(step, epoch, batch) for step, epoch, batch, _ in saves] == [(2, 0, 2), (3, 1, 0), (4, 1, 1), (6, 2, 0)]
    assert [best for *_, best in saves][0::2] == [False, False]
    assert saves[1][3] is True


def test_a_checkpoint_holds_the_run_state(small):
    config = small(trainer={"epochs": 1})
    run(config)
    state = checkpoint(config["run_dir"])
    assert state["format"] == loop.CHECKPOINT_FORMAT == 1
    assert (state["epoch"], state["batch"], state["global_step"], state["processes"]) == (1, 0, 3, 1)
    assert state["replicas"] is None
    assert state["epoch_totals"] == {"loss_sum": 0.0, "correct": 0, "count": 0, "skipped": 0, "train_time_s": 0.0}
    assert state["schedule"]["last_epoch"] == 3 and state["schedule"]["_step_count"] == 4
    assert state["metrics"] == metrics_of(config["run_dir"])
    assert state["config"] == loop.to_plain(load_config(config))
    assert state["wall_time_s"] >= state["metrics"][-1]["wall_time_s"]
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["analysis"] == [] and isinstance(state["wandb_id"], str)
    assert set(state["model"]) == {"head.weight", "head.bias"}
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_a_mid_epoch_checkpoint_holds_the_partial_epoch_sums(small, monkeypatch):
    steps = record_steps(monkeypatch)
    stop_at_call(monkeypatch, 3, KeyboardInterrupt())
    config = small(trainer={"checkpoint_every_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        run(config)
    state = checkpoint(config["run_dir"])
    totals = state["epoch_totals"]
    assert (state["epoch"], state["batch"], state["global_step"]) == (0, 2, 2)
    assert (totals["count"], totals["skipped"]) == (32, 0)
    assert totals["loss_sum"] == pytest.approx(16 * steps[0]["loss"] + 16 * steps[1]["loss"], rel=1e-6)
    assert totals["correct"] == sum(int((s["logits"].argmax(1) == s["targets"]).sum()) for s in steps[:2])
    assert totals["train_time_s"] > 0


def test_a_run_killed_mid_epoch_resumes_bit_for_bit_with_dropout(small, tmp_path, monkeypatch, capsys):
    changes = {"model": {"name": "pyramidnet110", "kwargs": {"depth": 8, "dropout": 0.5}},
               "trainer": {"checkpoint_every_steps": 2}}
    reference = small(run_dir=str(tmp_path / "reference"), **changes)
    run(reference)
    interrupted = small(run_dir=str(tmp_path / "interrupted"), **changes)
    interrupt_at_call(monkeypatch, interrupted, 6)  # in epoch 2, after the checkpoint of step 4
    capsys.readouterr()
    summary = run(interrupted)
    lines = output_lines(capsys)
    assert lines[0].startswith("resuming sgd on cifar10 with pyramidnet8")
    assert lines[0].endswith(f"(amp off), from epoch 2, batch 1; records in {interrupted['run_dir']}")
    assert lines[1].startswith("epoch 2/2  ")
    assert without_times(metrics_of(interrupted["run_dir"])) == without_times(metrics_of(reference["run_dir"]))
    straight, resumed = checkpoint(reference["run_dir"]), checkpoint(interrupted["run_dir"])
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert summary["wandb_id"] == resumed["wandb_id"] != straight["wandb_id"]
    assert summary["global_steps"] == 6
    launches = [json.loads(line)
                for line in (Path(interrupted["run_dir"]) / "launches.jsonl").read_text().splitlines()]
    assert [(l["from_epoch"], l["from_batch"], l["from_step"]) for l in launches] == [(0, 0, 0), (1, 1, 4)]
    # the resumed epoch's time adds the time trained before the kill
    assert metrics_of(interrupted["run_dir"])[1]["epoch_time_s"] > 0


def test_a_run_resumed_at_an_epoch_boundary_says_so_without_a_batch(small, monkeypatch, capsys):
    config = small()
    interrupt_at_call(monkeypatch, config, 4)
    capsys.readouterr()
    run(config)
    first = output_lines(capsys)[0]
    assert first.endswith(f"(amp off), from epoch 2; records in {config['run_dir']}")
    assert [row["epoch"] for row in metrics_of(config["run_dir"])] == [1, 2]


def test_a_resumed_run_continues_its_wall_time(small, monkeypatch):
    config = small()
    interrupt_at_call(monkeypatch, config, 4)
    path = Path(config["run_dir"]) / "checkpoints" / "last.pt"
    torch.save({**checkpoint(config["run_dir"]), "wall_time_s": 1000.0}, path)  # as if the first launch took 1000 s
    summary = run(config)
    assert 1000.0 < metrics_of(config["run_dir"])[1]["wall_time_s"] <= summary["wall_time_s"] < 1100.0


def test_relaunching_a_finished_run_returns_its_summary_without_training(small, monkeypatch, capsys):
    config = small()
    summary = run(config)
    capsys.readouterr()
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("a finished run trained again"))
    assert run(config) == summary
    assert output_lines(capsys) == [f"skipped: {config['run_dir']} is finished (summary.json exists); delete the "
                                    "folder to train it again"]
    assert len((Path(config["run_dir"]) / "launches.jsonl").read_text().splitlines()) == 1


def test_a_finished_wandb_run_names_the_backfill_script(small, capsys):
    config = small(trainer={"epochs": 1})
    run(config)
    capsys.readouterr()
    run(small(trainer={"epochs": 1}, logger={"backend": "wandb"}))
    assert output_lines(capsys) == [
        f"skipped: {config['run_dir']} is finished (summary.json exists); delete the folder to train it again; to "
        f"send its records to wandb: python scripts/wandb_backfill.py {config['run_dir']}"]


def test_a_folder_of_another_setting_is_refused_before_anything_is_touched(small):
    config = small(trainer={"epochs": 1})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    with pytest.raises(CheckpointError) as error:
        run(small(trainer={"epochs": 1, "seed": 2}))
    assert str(error.value) == (
        f"{config['run_dir']} holds a run of another setting (seed: 1 -> 2): a changed setting is a new run, "
        f"so leave run_dir out (each setting gets its own folder) or delete {config['run_dir']} to start over")


def test_a_checkpoint_of_another_setting_is_refused_even_without_config_yaml(small):
    config = small(trainer={"epochs": 1})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    (Path(config["run_dir"]) / "config.yaml").unlink()
    with pytest.raises(CheckpointError) as error:
        run(small(trainer={"epochs": 1, "seed": 2}))
    folder = Path(config["run_dir"]) / "checkpoints"
    assert str(error.value).startswith(f"{folder} holds a run of another setting (seed: 1 -> 2)")


def test_a_checkpoint_without_a_readable_config_is_refused(small):
    config = small(trainer={"epochs": 1})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    (Path(config["run_dir"]) / "config.yaml").unlink()
    for name in ("last.pt", "last.prev.pt"):
        path = Path(config["run_dir"]) / "checkpoints" / name
        if path.exists():
            state = torch.load(path, weights_only=True)
            state["config"] = {"optimizer": {"name": "no such method"}}
            torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        run(config)
    assert str(error.value) == (f"the checkpoint in {Path(config['run_dir']) / 'checkpoints'} holds no config this "
                                "version can read: delete the folder to start over")


def test_a_checkpoint_of_another_model_shape_is_refused(small):
    config = small(trainer={"epochs": 1})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    path = Path(config["run_dir"]) / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["head.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        run(config)
    with pytest.raises(RuntimeError) as direct:
        TinyNet(10).load_state_dict(state["model"])
    first_line = str(direct.value).splitlines()[0]
    assert str(error.value) == (f"the checkpoint in {path.parent} does not fit this run's model or optimizer "
                                f"({first_line}): delete the folder to start over")


def test_an_unreadable_config_yaml_is_refused(small):
    config = small(trainer={"epochs": 1})
    Path(config["run_dir"]).mkdir(parents=True)
    (Path(config["run_dir"]) / "config.yaml").write_text("optimizer:\n  name: no such method\n")
    with pytest.raises(RunFolderError) as error:
        run(config)
    assert str(error.value) == (f"{config['run_dir']}/config.yaml is not a config this version can read: use another "
                                f"run_dir, or delete {config['run_dir']} to start over")


def test_a_folder_held_by_another_process_is_refused(small):
    config = small(trainer={"epochs": 1})
    holder = RunFolder(config["run_dir"])
    holder.hold()
    try:
        with pytest.raises(RunFolderError) as error:
            run(config)
        with pytest.raises(RunFolderError) as direct:
            RunFolder(config["run_dir"]).hold()
        assert str(error.value) == str(direct.value) and "None" not in str(error.value)
        assert not (Path(config["run_dir"]) / "launches.jsonl").exists()
    finally:
        holder.release()
    run(config)  # released by the run that was refused as well


def another_process_can_lock(lock: Path) -> bool:
    """Whether a second process gets an exclusive flock on ``lock`` now (it lets go at once)."""
    probe = subprocess.run([sys.executable, "-c", "import fcntl, os, sys; descriptor = os.open(sys.argv[1], os.O_RDWR); "
                            "fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(lock)], capture_output=True)
    return probe.returncode == 0


def test_the_lock_is_held_while_summary_json_is_written_so_no_second_writer_fits_in_before_it(small, monkeypatch):
    import fsam.runfolder as runfolder

    config = small()
    lock = Path(config["run_dir"]) / ".lock"
    real, lockable_at_summary = runfolder.write_json_atomic, []

    def observed(path, record):
        if Path(path).name == "summary.json":
            lockable_at_summary.append(another_process_can_lock(lock))
        real(path, record)

    monkeypatch.setattr(runfolder, "write_json_atomic", observed)
    run(config)
    assert lockable_at_summary == [False]
    assert another_process_can_lock(lock)  # and given up once the run returns


# The writes of a run, each made the first to hit a file system turned read-only: (training steps before it, the
# file named, the checkpoints kept, the global step of last.pt then). Epochs of 3 steps, a checkpoint after each.
READ_ONLY_AT = {
    "config.yaml": (0, "config.yaml", "no checkpoint was written yet", None),
    "launches.jsonl": (0, "launches.jsonl", "no checkpoint was written yet", None),
    "last.pt": (2, "checkpoints/last.pt", "the checkpoints last.pt are kept", 1),
    "best.pt": (0, "checkpoints/best.pt", "the checkpoints last.pt, last.prev.pt are kept", 2),
    "metrics.jsonl": (1, "metrics.jsonl", "the checkpoints last.pt, last.prev.pt are kept", 3),
    "final.pt": (0, "checkpoints/final.pt", "the checkpoints last.pt, last.prev.pt are kept", 6),
    "summary.json": (0, "summary.json", "the checkpoints last.pt, last.prev.pt are kept", 6),
}


@pytest.mark.parametrize("write", list(READ_ONLY_AT))
def test_a_folder_turning_read_only_at_any_write_stops_the_run_saying_which_checkpoints_are_kept(small, monkeypatch,
                                                                                                  write):
    after_steps, name, kept, last_step = READ_ONLY_AT[write]
    config = small(trainer={"checkpoint_every_steps": 1})
    run_dir = Path(config["run_dir"])
    with monkeypatch.context() as patch:
        ReadOnlyFileSystem(run_dir, name=write, after_steps=after_steps).install(patch.setattr)
        with pytest.raises(RunFolderError) as error:
            run(config)
    assert str(error.value) == (f"cannot write {run_dir / name} (Read-only file system): {kept}; make the file "
                                "system writable, then relaunch the same command to continue")
    assert not (run_dir / "summary.json").exists()
    if last_step is None:
        assert not (run_dir / "checkpoints" / "last.pt").exists()
    else:
        assert checkpoint(run_dir)["global_step"] == last_step
    if write == "best.pt":
        assert not (run_dir / "checkpoints" / "best.pt").exists()  # never a best.pt ahead of or behind last.pt
    run(config)  # writable again: the relaunch continues and finishes as if nothing had happened
    reference = small(run_dir=str(run_dir.parent / "reference"))
    run(reference)
    assert without_times(metrics_of(run_dir)) == without_times(metrics_of(reference["run_dir"]))
    assert checkpoint(run_dir, "best.pt")["epoch"] == checkpoint(reference["run_dir"], "best.pt")["epoch"]


# ---------------------------------------------------------------------------------------- divergence, memory


def nan_loss_at(monkeypatch, call: int) -> None:
    """From the ``call``-th step on, the step reports a NaN loss."""
    real = loop.train_step
    calls = {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if calls["n"] >= call else out

    monkeypatch.setattr(loop, "train_step", diverging)


def test_a_nan_loss_stops_the_run_and_marks_it_diverged(small, monkeypatch):
    nan_loss_at(monkeypatch, 5)
    config = small(trainer={"log_every": 100})
    with pytest.raises(DivergedError) as error:
        run(config)
    last = Path(config["run_dir"]) / "checkpoints" / "last.pt"
    message = (f"training diverged: the loss became nan in epoch 2 by step 6; the last good checkpoint is {last}; "
               "lower optimizer.lr or optimizer.rho, or use trainer.amp=bf16 or off")
    assert str(error.value) == message
    status = json.loads((Path(config["run_dir"]) / "status.json").read_text())
    assert status == {"status": "diverged", "message": message, "epoch": 2, "global_step": 6,
                      "last_checkpoint": str(last)}
    assert checkpoint(config["run_dir"])["global_step"] == 3
    assert not (Path(config["run_dir"]) / "summary.json").exists()

    monkeypatch.undo()
    with pytest.raises(DivergedError) as again:
        run(config)
    assert str(again.value) == (
        f"{config['run_dir']} diverged in an earlier launch ({message}); it is not trained again: a changed setting "
        "gets its own folder, or delete this one to retry")


def test_a_nan_loss_is_caught_at_the_next_log_point_before_any_checkpoint(small, monkeypatch):
    nan_loss_at(monkeypatch, 1)
    config = small(trainer={"log_every": 2})
    with pytest.raises(DivergedError) as error:
        run(config)
    assert "the loss became nan in epoch 1 by step 2; no checkpoint was written yet;" in str(error.value)


def test_a_nan_loss_is_never_saved_by_a_mid_epoch_checkpoint(small, monkeypatch):
    nan_loss_at(monkeypatch, 2)
    config = small(trainer={"log_every": 100, "checkpoint_every_steps": 2})
    with pytest.raises(DivergedError, match="by step 2; no checkpoint was written yet"):
        run(config)


def test_running_out_of_memory_names_the_fixes(small, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    config = small(trainer={"micro_batches": 2})
    with pytest.raises(FsamError) as error:
        run(config)
    assert str(error.value) == (
        "out of memory on cpu with trainer.batch_size=16 (CUDA out of memory. Tried to allocate 2 GiB): use a smaller "
        "trainer.batch_size (e.g. 8), or trainer.micro_batches=4 to keep the batch and split it, or "
        f"trainer.amp=bf16; the last checkpoint in {Path(config['run_dir']) / 'checkpoints'} is kept")


def test_a_skipped_step_counts_in_the_records_but_not_in_the_loss(small, monkeypatch, capsys):
    real = loop.train_step
    calls = {"n": 0}
    steps = []

    def skipping_second(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        steps.append((out.loss.item(), len(args[2])))
        return dataclasses.replace(out, skipped=True) if calls["n"] == 2 else out

    monkeypatch.setattr(loop, "train_step", skipping_second)
    config = small()
    summary = run(config)
    rows = metrics_of(config["run_dir"])
    assert [row["skipped_steps"] for row in rows] == [1, 0] and summary["skipped_steps"] == 1
    kept = [steps[0], steps[2]]
    assert rows[0]["train_loss"] == pytest.approx(sum(l * n for l, n in kept) / 24, rel=1e-6)
    assert rows[0]["images_per_s"] == pytest.approx(24 / rows[0]["epoch_time_s"])
    lines = output_lines(capsys)
    assert lines[1].endswith("img/s  1 fp16 steps skipped") and lines[2].endswith("img/s")


# ------------------------------------------------------------------------------------------------ signals


def signal_after_step(monkeypatch, step: int, signum: int) -> None:
    real = loop.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)


def test_a_stop_signal_checkpoints_after_the_step_and_stops(small, monkeypatch):
    signal_after_step(monkeypatch, 2, signal.SIGUSR1)
    config = small()
    handler_before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Interrupted) as error:
        run(config)
    folder = Path(config["run_dir"]) / "checkpoints"
    assert str(error.value) == (f"stopped by SIGUSR1 in epoch 1 after step 2: checkpoint saved in {folder}; run the "
                                "same command again to continue")
    assert error.value.signum == signal.SIGUSR1
    state = checkpoint(config["run_dir"])
    assert (state["epoch"], state["batch"], state["global_step"]) == (0, 2, 2)
    assert state["epoch_totals"]["count"] == 32
    assert signal.getsignal(signal.SIGUSR1) is handler_before


def test_a_stop_signal_goes_to_the_handler_installed_before_after_the_checkpoint(small, monkeypatch, capsys):
    config = small()
    handled = []

    def previous(signum, frame):
        handled.append((signum, checkpoint(config["run_dir"])["global_step"]))

    signal_after_step(monkeypatch, 2, signal.SIGUSR2)
    before = signal.signal(signal.SIGUSR2, previous)
    try:
        summary = run(config)
        after = signal.getsignal(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert handled == [(signal.SIGUSR2, 2)]
    assert after is previous
    assert summary["global_steps"] == 6
    folder = Path(config["run_dir"]) / "checkpoints"
    assert f"SIGUSR2 in epoch 1 after step 2: checkpoint saved in {folder}; passing the signal on" in output_lines(capsys)


def test_a_stop_signal_with_a_nan_loss_saves_nothing(small, monkeypatch):
    nan_loss_at(monkeypatch, 1)
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), real(*a, **k))[1])
    config = small(trainer={"log_every": 100})
    with pytest.raises(DivergedError, match="by step 1; no checkpoint was written yet"):
        run(config)


# -------------------------------------------------------------------------------- full gradients, wandb


def test_sam_full_refreshes_the_full_gradient_every_n_steps_and_says_what_it_costs(small, monkeypatch, capsys):
    real = loop.full_gradient
    at_steps = []

    def recording(*args, **kwargs):
        at_steps.append(trainer_progress["step"])
        return real(*args, **kwargs)

    trainer_progress = {"step": None}
    real_work = loop._Trainer._full_gradient_work

    def work(self):
        trainer_progress["step"] = self.progress.global_step
        return real_work(self)

    monkeypatch.setattr(loop, "full_gradient", recording)
    monkeypatch.setattr(loop._Trainer, "_full_gradient_work", work)
    config = small(optimizer={"name": "sam", "perturbation": "full", "full_grad_every": 4})
    summary = run(config)
    assert at_steps == [0, 4]
    # the training set in order is 40 images in batches of 16: 3 batches, every 4 steps -> 0.75 passes per step
    assert summary["full_gradient_passes_per_step"] == 0.75
    assert ("full-batch gradient every 4 steps for the perturbation: 0.75 extra forward+backward passes per step "
            "on average (a SAM step does 2)") in output_lines(capsys)


def test_fsam_measures_its_ema_every_n_steps_after_the_first(small, monkeypatch, capsys):
    config = small(optimizer={"name": "fsam"}, trainer={"full_grad_analysis_every": 2})
    summary = run(config)
    rows = metrics_of(config["run_dir"])
    assert [[entry["step"] for entry in row["analysis"]] for row in rows] == [[2], [4]]
    for row in rows:
        for entry in row["analysis"]:
            assert set(entry) == {"step", "ema_cosine", "ema_relative_error"}
            assert -1.0 <= entry["ema_cosine"] <= 1.0 and entry["ema_relative_error"] >= 0
    assert "full_gradient_passes_per_step" not in summary
    assert ("full-batch gradient every 2 steps to measure the EMA against: 1.5 extra forward+backward passes per "
            "step on average (a SAM step does 2)") in output_lines(capsys)


def test_asking_a_method_without_an_ema_to_measure_it_says_nothing_is_measured(small, capsys):
    config = small(trainer={"full_grad_analysis_every": 2, "epochs": 1})
    run(config)
    lines = output_lines(capsys)
    assert lines[0] == ("note: trainer.full_grad_analysis_every measures F-SAM's EMA; sgd has none, so nothing is "
                        "measured")
    assert "analysis" not in metrics_of(config["run_dir"])[0]


def test_bf16_on_the_cpu_runs_as_float32_and_says_so_first(small, capsys):
    summary = run(small(trainer={"amp": "bf16", "epochs": 1}))
    lines = output_lines(capsys)
    assert lines[0] == "note: trainer.amp=bf16 runs as off (float32) on the CPU, where bf16 autocast is slower"
    assert summary["amp"] == "off" and "(amp off)" in lines[1]


class FakeWandbRun:
    """Stands for a started wandb run: records what the mirror sends."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.exit_codes: list[int] = []

    def log(self, row, step):
        self.logged.append((dict(row), step))

    def finish(self, exit_code=0):
        self.exit_codes.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch) -> list:
    """Every WandbMirror.start makes a FakeWandbRun (appended to the list returned) with the start's arguments."""
    runs = []

    def start(self, plain_config, *, resumed):
        self.run = FakeWandbRun()
        self.run.started = {"config": plain_config, "resumed": resumed, "id": self.run_id, "group": self.group,
                            "name": self.name, "run_dir": self.run_dir}
        runs.append(self.run)

    monkeypatch.setattr(loop.WandbMirror, "start", start)
    return runs


def test_wandb_gets_the_mean_loss_since_its_last_point_each_epoch_row_and_the_summary(small, monkeypatch,
                                                                                       fake_wandb):
    monkeypatch.setattr(loop, "STEP_POINTS", 2)  # 6 steps // 2 = 3: log_every 2 is the shorter interval
    steps = record_steps(monkeypatch)
    config = small(trainer={"log_every": 2})
    summary = run(config)
    (wandb_run,) = fake_wandb
    rows = metrics_of(config["run_dir"])
    points = [(row, step) for row, step in wandb_run.logged if "train/loss" in row]
    assert [step for _, step in points] == [2, 3, 4, 6]
    loss = [s["loss"] for s in steps]
    # step 2: steps 1-2; step 3: the epoch's last; step 4: step 4 alone (a new epoch); step 6: steps 5-6
    expected = [(16 * loss[0] + 16 * loss[1]) / 32, loss[2], loss[3], (16 * loss[4] + 8 * loss[5]) / 24]
    assert [row["train/loss"] for row, _ in points] == pytest.approx(expected, rel=1e-5)
    assert [row["train/lr"] for row, _ in points] == pytest.approx([steps[i]["lr"] for i in (1, 2, 3, 5)])
    epochs = [(row, step) for row, step in wandb_run.logged if "train/loss" not in row]
    assert [step for _, step in epochs] == [3, 6]
    assert [row for row, _ in epochs] == [epoch_record(row) for row in rows]
    assert wandb_run.summary == {key: value for key, value in summary.items() if value is not None}
    assert wandb_run.exit_codes == [0]
    started = wandb_run.started
    assert started["resumed"] is False and started["id"] == summary["wandb_id"]
    assert started["run_dir"] == config["run_dir"]
    assert started["group"] == summary["setting"] and started["name"] == f"{summary['setting']}-seed1"
    assert started["config"]["identity"]["setting"] == summary["setting"]
    assert started["config"]["trainer"]["log_every"] == 2


@pytest.mark.parametrize(("log_every", "step_points", "logged_at"), [
    (100, 100, [1, 2, 3, 4, 5, 6]),  # a run shorter than the points it should have: every step
    (100, 3, [2, 3, 4, 6]),  # 6 steps // 3 points: every 2 steps, and each epoch's last step (3 and 6)
    (4, 1, [3, 4, 6]),  # log_every is the longest interval
    (1, 100, [1, 2, 3, 4, 5, 6]),
])
def test_every_run_gets_a_per_step_curve_however_short(small, monkeypatch, fake_wandb, log_every, step_points,
                                                      logged_at):
    monkeypatch.setattr(loop, "STEP_POINTS", step_points)
    steps = record_steps(monkeypatch)
    run(small(trainer={"log_every": log_every}))
    points = [(row, step) for row, step in fake_wandb[0].logged if "train/loss" in row]
    assert [step for _, step in points] == logged_at
    assert [row["train/lr"] for row, _ in points] == pytest.approx([steps[step - 1]["lr"] for step in logged_at])
    since = [0, *logged_at]
    weights = [s["n"] * s["loss"] for s in steps]
    # each point the mean over the steps since the previous one, within its epoch (3 steps an epoch)
    expected = []
    for before, at in zip(since, since[1:]):
        first = max(before, 3 * ((at - 1) // 3))
        expected.append(sum(weights[first:at]) / sum(s["n"] for s in steps[first:at]))
    assert [row["train/loss"] for row, _ in points] == pytest.approx(expected, rel=1e-5)


def test_logging_every_step_to_wandb_changes_nothing_the_run_computes(small, monkeypatch):
    quiet = small(trainer={"log_every": 100})  # no wandb
    run(quiet)
    logged = small(run_dir=quiet["run_dir"] + "-logged", trainer={"log_every": 1})
    wandb_run = FakeWandbRun()
    monkeypatch.setattr(loop.WandbMirror, "start", lambda self, *args, **kwargs: setattr(self, "run", wandb_run))
    run(logged)
    assert [step for row, step in wandb_run.logged if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
    assert without_times(metrics_of(logged["run_dir"])) == without_times(metrics_of(quiet["run_dir"]))
    for name, tensor in checkpoint(quiet["run_dir"])["model"].items():
        assert torch.equal(checkpoint(logged["run_dir"])["model"][name], tensor), name


def test_wandb_points_skip_an_interval_without_counted_examples(small, monkeypatch, fake_wandb):
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: dataclasses.replace(real(*a, **k), skipped=True))
    run(small(trainer={"log_every": 1, "epochs": 1}))
    assert [step for row, step in fake_wandb[0].logged if "train/loss" in row] == []


def test_a_resumed_run_continues_the_same_wandb_run(small, monkeypatch, fake_wandb):
    config = small()
    interrupt_at_call(monkeypatch, config, 4)
    run(config)
    first, second = fake_wandb
    assert second.started["resumed"] is True and second.started["id"] == first.started["id"]


def test_wandb_hears_of_an_interrupted_or_diverged_run_as_failed(small, monkeypatch, fake_wandb):
    signal_after_step(monkeypatch, 1, signal.SIGUSR1)
    with pytest.raises(Interrupted):
        run(small())
    nan_loss_at(monkeypatch, 1)
    with pytest.raises(DivergedError):
        run(small(run_dir=small()["run_dir"] + "-nan"))
    assert [wandb_run.exit_codes for wandb_run in fake_wandb] == [[1], [1]]


def test_fsam_measurements_go_to_wandb_at_their_step(small, fake_wandb):
    run(small(optimizer={"name": "fsam"}, trainer={"full_grad_analysis_every": 2, "epochs": 1, "log_every": 100}))
    analysis = [(sorted(row), step) for row, step in fake_wandb[0].logged if "analysis/ema_cosine" in row]
    assert analysis == [(["analysis/ema_cosine", "analysis/ema_relative_error"], 2)]


# ================================================================================ helpers, one module at a time
# ------------------------------------------------------------------------------------------------- schedule


def factor_of(steps_per_epoch=4, epochs=2, lr=0.1, **schedule):
    return lr_factor(ScheduleConfig(**schedule), lr=lr, steps_per_epoch=steps_per_epoch, epochs=epochs)


def test_cosine_falls_from_one_to_zero_over_all_steps_and_stays_at_zero():
    factor = factor_of()  # 8 steps
    values = [factor(step) for step in (0, 2, 4, 6, 8, 10)]
    assert values == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)),
                                    0.0, 0.0], abs=1e-15)


def test_warmup_rises_linearly_from_warmup_lr_then_the_cosine_spans_the_remaining_steps():
    factor = factor_of(warmup_epochs=0.5, warmup_lr=0.01)  # 2 warmup steps of 8, lr 0.1
    assert [factor(step) for step in (0, 1)] == pytest.approx([0.1, 0.55])  # 0.01 / 0.1, (0.01 + 0.09 / 2) / 0.1
    assert [factor(step) for step in (2, 5, 8)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)


def test_a_warmup_as_long_as_the_run_leaves_the_cosine_at_one():
    factor = factor_of(warmup_epochs=2, warmup_lr=0.0)
    assert [factor(step) for step in (0, 4, 8)] == pytest.approx([0.0, 0.5, 1.0])


def test_a_one_step_cosine_reaches_zero_after_its_step():
    factor = factor_of(steps_per_epoch=1, epochs=1)
    assert (factor(0), factor(1)) == pytest.approx((1.0, 0.0), abs=1e-15)


def test_the_schedule_warms_up_to_the_optimizer_rate():
    model = nn.Linear(2, 2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    config = ScheduleConfig(warmup_epochs=1, warmup_lr=0.02)
    schedule = create_schedule(plain, config, lr=0.1, steps_per_epoch=2, epochs=2)
    rates = [plain.param_groups[0]["lr"]]
    for _ in range(2):
        plain.step()
        schedule.step()
        rates.append(plain.param_groups[0]["lr"])
    assert rates == pytest.approx([0.02, 0.06, 0.1])


def test_multistep_multiplies_by_gamma_from_each_milestone_epoch_on():
    factor = factor_of(epochs=4, name="multistep", milestones=[1, 3], gamma=0.1)  # boundaries at steps 4 and 12
    assert [factor(step) for step in (0, 3, 4, 11, 12, 15)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert factor_of(epochs=4, name="multistep")(15) == 1.0  # no milestones


def test_the_schedule_sets_the_rate_of_the_base_optimizer_of_a_wrapper_and_of_a_plain_one():
    model = nn.Linear(2, 2)
    sam = loop.create_optimizer(model, "sam", lr=0.1)
    schedule = create_schedule(sam, ScheduleConfig(), lr=0.1, steps_per_epoch=2, epochs=1)
    assert schedule.optimizer is sam.base_optimizer
    sam.base_optimizer.step()
    schedule.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = create_schedule(plain, ScheduleConfig(), lr=0.1, steps_per_epoch=2, epochs=1)
    for _ in range(2):
        plain.step()
        schedule.step()
    assert plain.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


# ------------------------------------------------------------------------------------------------- evaluate


def test_topk_counts_rows_with_the_target_among_the_k_best_and_k_beyond_the_classes_counts_all():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5], [0.0, 0.1, 0.2]])
    targets = torch.tensor([1, 1, 0, 0])  # ranks 1, 2, 3, 3
    assert topk_correct(logits, targets, (1, 2, 3, 5)).tolist() == [1, 2, 4, 4]
    assert topk_correct(logits, targets, (2,)).tolist() == [2]
    assert topk_correct(logits, targets, (1, 2)).dtype == torch.int64


class ListLoader:
    def __init__(self, batches):
        self.batches = batches
        self.epochs = []

    def iterate(self, epoch, start_batch=0):
        self.epochs.append(epoch)
        return iter(self.batches[start_batch:])


def test_evaluate_averages_over_examples_not_batches_and_leaves_eval_mode():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    inputs = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0], [0, 3.0, 1.0]])
    targets = torch.tensor([0, 1, 0, 2, 2])  # rows 0 and 1 right; rows 0, 1 and 4 in the top 2 (3 classes: all top 5)
    loader = ListLoader([(inputs[:4], targets[:4]), (inputs[4:], targets[4:])])
    model.train()
    result = evaluate(model, loader, Precision("off"), torch.device("cpu"), split="val")
    per_example = F.cross_entropy(inputs, targets, reduction="none")
    assert result == pytest.approx({"val_loss": per_example.mean().item(), "val_top1": 40.0, "val_top5": 100.0})
    assert abs(result["val_loss"] - (per_example[:4].mean() + per_example[4]).item() / 2) > 1e-3
    assert not model.training and loader.epochs == [0]
    assert list(evaluate(model, loader, Precision("off"), torch.device("cpu"))) == ["test_loss", "test_top1",
                                                                                    "test_top5"]


def test_evaluate_of_an_empty_split_is_zero_not_a_division_by_zero():
    result = evaluate(nn.Linear(3, 3), ListLoader([]), Precision("off"), torch.device("cpu"))
    assert result == {"test_loss": 0.0, "test_top1": 0.0, "test_top5": 0.0}


# ---------------------------------------------------------------------------------------------- checkpoints


def test_a_save_rotates_last_to_previous_and_best_is_the_last_it_was_saved_with(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": 1}, best=True)
    assert sorted(path.name for path in store.folder.iterdir()) == ["best.pt", "last.pt"]
    assert os.path.samefile(store.best, store.last)  # a hard link, not a second copy
    store.save({"model": 2})
    store.save({"model": 3})
    load = lambda path: torch.load(path, weights_only=True)["model"]  # noqa: E731
    assert (load(store.last), load(store.previous), load(store.best)) == (3, 2, 1)
    assert sorted(path.name for path in store.folder.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]
    assert store.load_latest() == {"model": 3}


def test_best_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": 1}, best=True)
    assert not os.path.samefile(store.best, store.last)
    assert store.best.read_bytes() == store.last.read_bytes()
    assert sorted(path.name for path in store.folder.iterdir()) == ["best.pt", "last.pt"]


def test_the_previous_checkpoint_is_read_when_last_is_missing(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": 1})
    store.save({"model": 2})
    store.last.unlink()  # killed between the two renames of a save
    assert store.load_latest() == {"model": 1}


def test_a_temporary_file_that_could_not_be_opened_is_reported_like_any_failed_write(tmp_path, monkeypatch):
    import errno
    import fsam.engine.checkpoint as checkpoint_module

    store = CheckpointStore(tmp_path / "checkpoints")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_module, "open", refused, raising=False)
    with pytest.raises(RunFolderError, match=r"\(Permission denied\): no checkpoint was written yet; make the folder "):
        store.save({"model": 1})


def test_a_best_copy_that_fails_is_reported_and_changes_no_checkpoint(tmp_path, monkeypatch):
    import errno
    import shutil

    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": 1})

    def fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", fails)
    monkeypatch.setattr(shutil, "copyfile", fails)
    with pytest.raises(RunFolderError) as error:
        store.save({"model": 2}, best=True)
    assert str(error.value) == (f"cannot write {store.best} (No space left on device): the checkpoints last.pt are "
                                "kept; free space on that disk, then relaunch the same command to continue")
    assert store.load_latest() == {"model": 1}
    assert sorted(path.name for path in store.folder.iterdir()) == ["last.pt"]  # no temporary left


def test_a_store_in_a_deleted_run_folder_is_not_recreated(tmp_path):
    with pytest.raises(FileNotFoundError):
        CheckpointStore(tmp_path / "gone" / "checkpoints").save({"model": 1})
    assert not (tmp_path / "gone").exists()


def test_no_checkpoint_is_none_and_an_unreadable_last_falls_back_to_the_previous_with_a_warning(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.load_latest() is None
    store.save({"model": 1})
    store.save({"model": 2})
    store.last.write_bytes(b"torn")
    assert store.load_latest() == {"model": 1}
    assert capsys.readouterr().err == f"warning: checkpoint {store.last} is unreadable, trying the previous one\n"


def test_no_readable_checkpoint_names_each_file_and_why(tmp_path, capsys):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"weights": 1})
    store.save({"weights": 2})
    with pytest.raises(CheckpointError) as error:
        store.load_latest()
    reason = "(not a checkpoint of this engine)"
    assert str(error.value) == (f"no readable checkpoint in {store.folder}: {store.last} {reason}; {store.previous} "
                                f"{reason}; delete the folder to start over")
    store.previous.unlink()
    store.last.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        store.load_latest()
    assert str(error.value).startswith(f"no readable checkpoint in {store.folder}: {store.last} (")
    assert str(error.value).endswith("); delete the folder to start over")
    torch.save([1, 2], store.last)
    with pytest.raises(CheckpointError, match="not a checkpoint of this engine"):
        store.load_latest()
    assert capsys.readouterr().err.count("is unreadable") == 1


def test_an_unreadable_last_is_reported_with_the_error_type_and_first_line(tmp_path, monkeypatch, capsys):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": 1})

    def failing(*args, **kwargs):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(torch, "load", failing)
    with pytest.raises(CheckpointError) as error:
        store.load_latest()
    assert f"{store.last} (ValueError: first line);" in str(error.value)

    def silent(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(torch, "load", silent)
    with pytest.raises(CheckpointError) as error:
        store.load_latest()
    assert f"{store.last} (ValueError: );" in str(error.value)


def test_load_latest_maps_tensors_where_it_is_told(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": torch.ones(1)})
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    store.load_latest(map_location="meta")
    assert seen == [{"map_location": "meta", "weights_only": True}]
    store.load_latest()
    assert seen[1]["map_location"] == "cpu"


@pytest.mark.parametrize("saved, kept", [(0, "no checkpoint was written yet"), (1, "the checkpoints last.pt are kept"),
                                         (2, "the checkpoints last.pt, last.prev.pt are kept")])
def test_a_failed_write_keeps_the_checkpoints_and_says_which(tmp_path, monkeypatch, saved, kept):
    import errno

    store = CheckpointStore(tmp_path / "checkpoints")
    for number in range(saved):
        store.save({"model": number})
    before = {path.name: path.read_bytes() for path in store.folder.glob("*")} if saved else {}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunFolderError) as error:
        store.save({"model": 9}, best=True)
    assert str(error.value) == (f"cannot write {store.last} (No space left on device): {kept}; free space on that "
                                "disk, then relaunch the same command to continue")
    assert {path.name: path.read_bytes() for path in store.folder.glob("*")} == before  # no temporary left


def test_torch_reports_a_failed_write_as_a_runtime_error_which_becomes_the_same_message(tmp_path, monkeypatch):
    import errno

    store = CheckpointStore(tmp_path / "checkpoints")

    def wrapped(*args, **kwargs):
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as cause:
            raise RuntimeError("PytorchStreamWriter failed") from cause

    monkeypatch.setattr(torch, "save", wrapped)
    with pytest.raises(RunFolderError, match=r"\(Read-only file system\): no checkpoint was written yet; make the "):
        store.save({"model": 1})

    def other(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", other)
    with pytest.raises(RuntimeError, match="something else"):
        store.save({"model": 1})
    assert list(store.folder.iterdir()) == []


def test_a_failed_rename_keeps_the_checkpoints(tmp_path, monkeypatch):
    import errno

    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"model": 1})

    def refused(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(RunFolderError) as error:
        store.save({"model": 2})
    assert str(error.value) == (f"cannot write {store.last} (Permission denied): the checkpoints last.pt are kept; "
                                "make the folder writable, then relaunch the same command to continue")
    monkeypatch.undo()
    assert sorted(path.name for path in store.folder.iterdir()) == ["last.pt"]


def test_the_os_error_behind_a_writer_error_is_found_by_cause_context_or_wording():
    cause = OSError(28, "No space left on device")
    by_cause = RuntimeError("outer")
    by_cause.__cause__ = cause
    assert _os_error_in(by_cause) is cause
    by_context = RuntimeError("outer")
    by_context.__context__ = cause
    assert _os_error_in(by_context) is cause
    assert _os_error_in(cause) is cause
    worded = _os_error_in(RuntimeError("[enforce fail] Write FAILED\nat inline_container.cc"))
    assert (worded.errno, worded.strerror) == (5, "[enforce fail] Write FAILED")
    assert _os_error_in(RuntimeError("file write error")).errno == 5
    assert _os_error_in(RuntimeError("write")) is None
    assert _os_error_in(RuntimeError("failed to read")) is None
    assert _os_error_in(RuntimeError("")) is None


def test_the_random_state_round_trips_through_a_checkpoint_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    path = tmp_path / "rng.pt"
    torch.save(capture_rng(), path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = torch.load(path, weights_only=True)
    assert state["cuda"] == [] and state["numpy"]["name"] == "MT19937"
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["keys"].dtype == torch.int64
    restore_rng(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_nested_lists_become_the_tuples_random_setstate_wants():
    assert _as_tuples([1, [2, [3]], (4,)]) == (1, (2, (3,)), (4,))
    assert _as_tuples("ab") == "ab"


# ------------------------------------------------------------------------------------------------- signals


@pytest.fixture
def quiet_signals():
    """The stop signals' handlers as they were before the test."""
    before = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_stop_signals_record_the_first_signal_and_give_the_handlers_back(quiet_signals):
    assert preemption.STOP_SIGNALS == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGUSR1, mine)
    ctrl_c = signal.getsignal(signal.SIGINT)  # Python's own, or ignore where the tests run in the background
    with StopSignals() as stops:
        assert all(signal.getsignal(signum) == stops._record for signum in preemption.STOP_SIGNALS)
        assert stops.received is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.received == signal.SIGUSR2 == stops.agreed(torch.device("cpu"))
        stops.clear()
        assert stops.received is None and stops.agreed(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C is recorded like the others
        assert stops.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second one stops at once
    assert signal.getsignal(signal.SIGUSR1) is mine
    assert signal.getsignal(signal.SIGINT) is ctrl_c


def test_under_ddp_the_processes_agree_on_the_largest_signal_any_received(monkeypatch):
    """Another process's flag is simulated: the all-reduce of the flags gives their maximum on every process."""
    other = {"flag": 0}
    flags = []

    def all_reduce_max(flag):
        flags.append(flag.clone())
        return flag.clamp_(min=other["flag"])

    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_max", all_reduce_max)
    stops = StopSignals()
    assert stops.agreed(torch.device("cpu")) is None  # nobody received one
    other["flag"] = int(signal.SIGUSR2)
    assert stops.agreed(torch.device("cpu")) == signal.SIGUSR2  # only the other process did
    stops.received = signal.SIGTERM  # 15 > 12
    assert stops.agreed(torch.device("cpu")) == signal.SIGTERM
    assert [flag.tolist() for flag in flags] == [[0], [0], [15]]
    assert all(flag.dtype == torch.int64 for flag in flags)


def test_only_a_function_installed_before_gets_the_signal_forwarded(quiet_signals):
    calls = []

    def mine(signum, frame):
        calls.append((signum, frame))

    signal.signal(signal.SIGUSR2, mine)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with StopSignals() as stops:
        pass
    assert stops.previous_handler(signal.SIGUSR2) is mine
    assert stops.previous_handler(signal.SIGTERM) is None  # ignore
    assert stops.previous_handler(signal.SIGUSR1) is None  # the default action
    assert stops.previous_handler(signal.SIGINT) is None  # Python's own KeyboardInterrupt
    assert stops.previous_handler(signal.SIGHUP) is None  # not one of ours
    stops.forward(signal.SIGUSR2)
    stops.forward(signal.SIGUSR1)
    assert calls == [(signal.SIGUSR2, None)]


def test_stop_signals_outside_the_main_thread_install_nothing(quiet_signals):
    import threading

    outcome = []

    def enter():
        with StopSignals() as stops:
            outcome.append(dict(stops._previous))

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join()
    assert outcome == [{}]


def test_signal_names():
    assert [signal_name(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)] == ["SIGTERM", "SIGUSR1",
                                                                                       "SIGINT"]


# --------------------------------------------------------------------------------------------------- wandb


class FakeWandb:
    """A stand-in for the wandb module: records ``init``'s arguments and returns a FakeWandbRun."""

    def __init__(self, fail_init=False):
        self.inits = []
        self.fail_init = fail_init
        self.runs = []

    def Settings(self, **kwargs):  # noqa: N802 - wandb's name
        return ("settings", kwargs)

    def init(self, **kwargs):
        if self.fail_init:
            raise ConnectionError("no server\ndetails")
        self.inits.append(kwargs)
        self.runs.append(FakeWandbRun())
        return self.runs[-1]


def logger(**changes):
    return dataclasses.replace(load_config({}).logger, backend="wandb", **changes)


def test_new_run_ids_are_twelve_hex_digits_and_differ():
    first, second = new_run_id(), new_run_id()
    assert len(first) == 12 and int(first, 16) >= 0 and first != second


def test_the_mirror_does_nothing_without_the_wandb_backend(monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    mirror = WandbMirror(load_config({}).logger, "/runs/a", "abc")
    mirror.start({}, resumed=False)
    mirror.log({"x": 1}, step=1)
    mirror.finish({"y": 2})
    assert fake.inits == [] and mirror.run is None and capsys.readouterr() == ("", "")


def test_the_mirror_starts_wandb_with_the_run_identity(monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.setattr("fsam.engine.wandb_mirror.resolve_mode", lambda mode: ("offline", None))
    mirror = WandbMirror(logger(tags=["a", "b"], entity="me"), "/runs/a", "abc", group="g", name="n")
    mirror.start({"k": 1}, resumed=True)
    assert fake.inits == [{
        "project": "fsam", "entity": "me", "group": "g", "tags": ["a", "b"], "name": "n", "mode": "offline",
        "dir": "/runs/a", "config": {"k": 1}, "id": "abc", "resume": "allow", "job_type": "train",
        "settings": ("settings", {"console": "wrap", "silent": True}),
    }]
    assert capsys.readouterr() == ("", "")
    own = WandbMirror(logger(group="mine", name="own"), "/runs/b", "def", group="g", name="n")
    own.start({}, resumed=False)
    assert (fake.inits[1]["group"], fake.inits[1]["name"], fake.inits[1]["tags"], fake.inits[1]["resume"]) == (
        "mine", "own", None, None)


def test_the_mirror_says_once_why_it_logs_offline(monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    asked = []
    monkeypatch.setattr("fsam.engine.wandb_mirror.resolve_mode",
                        lambda mode: (asked.append(mode), ("offline", "is not logged in"))[1])
    WandbMirror(logger(mode="online"), "/runs/a", "abc").start({}, resumed=False)
    assert asked == ["online"]
    assert capsys.readouterr().err == ("warning: wandb is not logged in: logging offline to /runs/a/wandb; upload "
                                       "later with `wandb sync /runs/a/wandb/offline-run-*`\n")
    assert fake.inits[0]["mode"] == "offline"


def test_without_wandb_installed_the_run_goes_on_with_one_warning(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    mirror = WandbMirror(logger(), "/runs/a", "abc")
    mirror.start({}, resumed=False)
    assert mirror.run is None
    assert capsys.readouterr().err == ("warning: wandb is not installed (pip install wandb); training continues "
                                       "without it, the run folder /runs/a has every record\n")


def test_a_failing_start_gives_up_with_one_warning(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", FakeWandb(fail_init=True))
    monkeypatch.setattr("fsam.engine.wandb_mirror.resolve_mode", lambda mode: ("offline", None))
    mirror = WandbMirror(logger(), "/runs/a", "abc")
    mirror.start({}, resumed=False)
    mirror.log({"x": 1}, step=1)
    mirror.finish()
    assert mirror.run is None
    assert capsys.readouterr().err == ("warning: wandb start failed (ConnectionError: no server); training continues "
                                       "without wandb, the run folder /runs/a has every record\n")


class BrokenRun(FakeWandbRun):
    def log(self, row, step):
        raise RuntimeError("")


def test_a_failing_log_warns_once_closes_the_run_and_stops_logging(capsys):
    mirror = WandbMirror(logger(), "/runs/a", "abc")
    mirror.run = broken = BrokenRun()
    mirror.log({"x": 1}, step=3)
    mirror.log({"x": 2}, step=4)
    mirror.finish({"a": 1})
    assert broken.exit_codes == [1] and mirror.run is None
    assert capsys.readouterr().err == ("warning: wandb log failed (RuntimeError: ); training continues without "
                                       "wandb, the run folder /runs/a has every record\n")


def test_finish_sends_the_summary_without_empty_values_and_the_exit_code():
    mirror = WandbMirror(logger(), "/runs/a", "abc")
    mirror.run = first = FakeWandbRun()
    mirror.finish({"a": 1, "b": None, "c": {"d": None}})
    assert (first.summary, first.exit_codes, mirror.run) == ({"a": 1, "c": {"d": None}}, [0], None)
    mirror.run = second = FakeWandbRun()
    mirror.finish(failed=True)
    assert (second.summary, second.exit_codes) == ({}, [1])


def test_a_finished_offline_run_says_where_it_is_and_the_command_that_uploads_every_launch(monkeypatch, tmp_path,
                                                                                             capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", FakeWandb())
    monkeypatch.setattr("fsam.engine.wandb_mirror.resolve_mode", lambda mode: ("offline", None))
    launches = [tmp_path / "run" / "wandb" / f"offline-run-2026010{day}_000000-abc" for day in (2, 1)]
    for folder in [*launches, tmp_path / "run" / "wandb" / "offline-run-20260103_000000-other"]:
        folder.mkdir(parents=True)
    for failed in (True, False):
        mirror = WandbMirror(logger(), str(tmp_path / "run"), "abc")
        mirror.start({}, resumed=True)
        mirror.finish({"a": 1}, failed=failed)
    first, second = sorted(launches)
    assert capsys.readouterr().out == (f"wandb: the run logged offline to {first}, {second}; upload with: wandb sync "
                                       f"{first} {second}\n")  # once: not for the failed launch
    monkeypatch.setattr("fsam.engine.wandb_mirror.resolve_mode", lambda mode: ("online", None))
    online = WandbMirror(logger(), str(tmp_path / "run"), "abc")
    online.start({}, resumed=True)
    online.finish({"a": 1})
    assert capsys.readouterr().out == ""


def test_a_failing_finish_warns_and_is_not_retried(capsys):
    class FailingFinish(FakeWandbRun):
        def finish(self, exit_code=0):
            self.exit_codes.append(exit_code)
            raise OSError("gone")

    mirror = WandbMirror(logger(), "/runs/a", "abc")
    mirror.run = run_ = FailingFinish()
    mirror.finish()
    assert run_.exit_codes == [0] and mirror.run is None
    assert "warning: wandb finish failed (OSError: gone);" in capsys.readouterr().err


def test_an_epoch_row_goes_to_wandb_at_its_step():
    mirror = WandbMirror(logger(), "/runs/a", "abc")
    mirror.run = fake = FakeWandbRun()
    row = {"epoch": 2, "step": 8, "train_loss": 0.5, "analysis": []}
    mirror.log_epoch(row)
    assert fake.logged == [(epoch_record(row), 8)]


# ---------------------------------------------------------------------------------------------- distributed


def test_one_process_is_the_main_one_and_not_distributed():
    info = distributed.DistInfo()
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and not info.distributed
    assert distributed.DistInfo(world_size=2).distributed and not distributed.DistInfo(rank=1).is_main


def test_device_names_resolve_or_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto") == torch.device("cpu")
    assert distributed.resolve_device("mps") == torch.device("mps")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as error:
            distributed.resolve_device(name)
        assert str(error.value) == (f"trainer.device={name} but no CUDA device is visible: use trainer.device=auto "
                                    "or cpu")
    with pytest.raises(ConfigError) as error:
        distributed.resolve_device("tpu")
    assert str(error.value) == "trainer.device='tpu' is not a device: use auto, cpu, cuda or cuda:N"


def test_cuda_resolves_to_the_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.resolve_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda") == torch.device("cuda", 0)
    assert distributed.resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)


def test_setup_of_one_process_reads_the_environment_and_joins_no_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") == distributed.DistInfo()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup("cpu") == distributed.DistInfo(rank=3, world_size=1, local_rank=2)
    assert not torch.distributed.is_initialized()


def test_slurm_tasks_without_torchrun_variables_export_them(monkeypatch):
    import sys
    import types

    exported = []

    class Environment:
        def export(self, **kwargs):
            exported.append(kwargs)

    helpers = types.ModuleType("submitit.helpers")
    helpers.TorchDistributedEnvironment = Environment
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    distributed._export_slurm_environment()
    monkeypatch.delenv("SLURM_NTASKS")
    distributed._export_slurm_environment()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("RANK", "0")
    distributed._export_slurm_environment()
    assert exported == []
    monkeypatch.delenv("RANK")
    distributed._export_slurm_environment()
    assert exported == [{"set_cuda_visible_devices": False}]


def test_without_a_process_group_the_collectives_give_back_what_they_got():
    model = nn.BatchNorm1d(2)
    assert distributed.wrap(model, distributed.DistInfo()) is model
    assert not distributed.is_active()
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and distributed.all_reduce_max(tensor) is tensor
    assert tensor.tolist() == [1.0, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_object("x") == ["x"]
    distributed.broadcast_buffers(model)
    distributed.barrier()
    distributed.teardown()


class FakeGroup:
    """A process group of two seen from one process: torch.distributed's calls are replaced by ones that record
    what was asked and play the other process's part (it holds ``other`` in every reduction)."""

    def __init__(self, monkeypatch, rank: int = 0, world_size: int = 2, other=None) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.other, self.calls = rank, world_size, other, []
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: self.world_size)
        monkeypatch.setattr(dist, "get_rank", lambda: self.rank)
        for name in ("all_reduce", "broadcast_object_list", "broadcast", "gather_object", "barrier"):
            monkeypatch.setattr(dist, name, getattr(self, name))

    def all_reduce(self, tensor, op=None):
        import torch.distributed as dist

        self.calls.append(("all_reduce", op))
        if op == dist.ReduceOp.SUM:
            tensor.add_(self.other)
        elif op == dist.ReduceOp.MAX:
            torch.maximum(tensor, self.other, out=tensor)

    def broadcast_object_list(self, box, src=None):
        self.calls.append(("broadcast_object_list", src))
        box[0] = f"rank {src}'s"

    def broadcast(self, tensor, src=None):
        self.calls.append(("broadcast", tensor.shape, src))
        tensor.fill_(7)

    def gather_object(self, value, gathered, dst=None):
        self.calls.append(("gather_object", value, gathered, dst))
        if gathered is not None:
            gathered[:] = [value, "the other's"]

    def barrier(self):
        self.calls.append(("barrier",))


def test_in_a_group_of_two_the_collectives_sum_take_the_maximum_and_share_rank_0s_values(monkeypatch):
    import torch.distributed as dist

    group = FakeGroup(monkeypatch, other=torch.tensor([3.0, 4.0]))
    assert distributed.is_active()
    assert distributed.all_reduce_sum(torch.tensor([1.0, 2.0])).tolist() == [4.0, 6.0]
    assert distributed.all_reduce_max(torch.tensor([1.0, 5.0])).tolist() == [3.0, 5.0]
    assert distributed.broadcast_object("mine") == "rank 0's"
    assert distributed.broadcast_object("mine", src=1) == "rank 1's"
    distributed.barrier()
    assert group.calls == [("all_reduce", dist.ReduceOp.SUM), ("all_reduce", dist.ReduceOp.MAX),
                           ("broadcast_object_list", 0), ("broadcast_object_list", 1), ("barrier",)]
    group.world_size = 1
    assert not distributed.is_active()


def test_in_a_group_of_two_rank_0_gathers_every_value_and_gives_its_buffers(monkeypatch):
    group = FakeGroup(monkeypatch)
    assert distributed.gather_object("mine") == ["mine", "the other's"]
    model = nn.BatchNorm1d(3)
    distributed.broadcast_buffers(model)
    assert model.running_mean.tolist() == [7.0, 7.0, 7.0] and model.num_batches_tracked.item() == 7
    assert group.calls == [("gather_object", "mine", ["mine", "the other's"], 0),
                           ("broadcast", torch.Size([3]), 0), ("broadcast", torch.Size([3]), 0),
                           ("broadcast", torch.Size([]), 0)]
    group.calls.clear()
    group.rank = 1
    assert distributed.gather_object("mine") is None
    assert distributed.gather_object("mine", dst=1) == ["mine", "the other's"]
    distributed.broadcast_buffers(model, src=1)
    assert group.calls[:2] == [("gather_object", "mine", None, 0), ("gather_object", "mine", ["mine", "the other's"], 1)]
    assert group.calls[2] == ("broadcast", torch.Size([3]), 1)


def test_several_processes_wrap_the_model_in_ddp_on_their_own_gpu(monkeypatch):
    made = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: made.append((model, device_ids)) or "wrapped")
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, distributed.DistInfo(world_size=2)) == "wrapped"
    assert distributed.wrap(model, distributed.DistInfo(world_size=2, device=torch.device("cuda", 1))) == "wrapped"
    assert made == [(model, None), (model, [1])]


def test_setup_of_several_processes_joins_the_group_with_the_backend_of_the_device(monkeypatch):
    import datetime
    import torch.distributed as dist

    joined, chosen = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert distributed.setup("cpu", timeout_minutes=5) == distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    info = distributed.setup("auto")
    assert info.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert joined == [
        ("gloo", {"rank": 1, "world_size": 2, "timeout": datetime.timedelta(minutes=5)}),
        ("nccl", {"rank": 1, "world_size": 2, "timeout": datetime.timedelta(minutes=30)}),
    ]
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    distributed.setup("cpu")
    assert len(joined) == 2  # one process, or a group already joined: nothing more


def test_setup_picks_the_device_automatically_by_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup().device == torch.device("cpu")


def test_in_a_process_group_of_one_the_collectives_are_the_identity(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert not distributed.is_active()  # one process: nothing to agree on
        tensor = torch.tensor([1.0, 3.0])
        assert distributed.all_reduce_sum(tensor).tolist() == [1.0, 3.0]
        assert distributed.all_reduce_max(tensor).tolist() == [1.0, 3.0]
        assert distributed.broadcast_object("rank 0's") == "rank 0's"
        assert distributed.gather_object(5) == [5]
        distributed.barrier()
        info = distributed.setup("cpu")  # already joined: not joined twice
        assert info.world_size == 1
    finally:
        distributed.teardown()
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------------- loop helpers


def test_another_setting_is_refused_with_at_most_eight_differences_listed():
    before = {f"k{n}": 0 for n in range(10)}
    refuse_other_run("here", before, dict(before))  # the same setting: nothing to refuse
    eight = {**before, **{f"k{n}": 1 for n in range(8)}}
    with pytest.raises(CheckpointError) as error:
        refuse_other_run("here", before, eight)
    listed = "; ".join(f"k{n}: 0 -> 1" for n in range(8))
    assert str(error.value) == (f"here holds a run of another setting ({listed}): a changed setting is a new run, "
                                "so leave run_dir out (each setting gets its own folder) or delete here to start over")
    ten = {f"k{n}": 1 for n in range(10)}
    with pytest.raises(CheckpointError) as error:
        refuse_other_run("here", before, ten)
    assert f"({listed}; and 2 more): a changed setting" in str(error.value)


def test_precision_modes_that_cannot_run_fall_back_to_float32_with_a_note(monkeypatch):
    cpu = torch.device("cpu")
    assert precision_mode("bf16", cpu) == (
        "off", "note: trainer.amp=bf16 runs as off (float32) on the CPU, where bf16 autocast is slower")
    assert precision_mode("fp16", cpu) == ("fp16", None) and precision_mode("off", cpu) == ("off", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"old GPU {device}")
    gpu = torch.device("cuda", 0)
    assert precision_mode("bf16", gpu) == ("off", "note: old GPU cuda:0 has no bf16: running float32 (or set "
                                                  "trainer.amp=fp16)")
    assert precision_mode("fp16", gpu) == ("fp16", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision_mode("bf16", gpu) == ("bf16", None)
    assert precision_mode("bf16", torch.device("mps")) == ("bf16", None)


def test_epoch_totals_start_at_zero_and_round_trip_through_plain_values():
    totals = EpochTotals.zeros(torch.device("cpu"))
    assert [t.dtype for t in (totals.loss_sum, totals.correct, totals.count, totals.skipped)] == [
        torch.float32, torch.int64, torch.int64, torch.int64]
    assert totals.to_plain() == {"loss_sum": 0.0, "correct": 0, "count": 0, "skipped": 0, "train_time_s": 0.0}
    saved = {"loss_sum": 12.5, "correct": 7, "count": 24, "skipped": 2, "train_time_s": 3.25}
    restored = EpochTotals.from_plain(saved, torch.device("cpu"))
    assert restored.to_plain() == saved
    assert restored.correct.dtype == torch.int64


def test_the_validation_pick_is_the_first_epoch_with_the_best_val_top1():
    rows = [{"epoch": 1, "val_top1": 50.0, "test_top1": 40.0}, {"epoch": 2, "val_top1": 60.0, "test_top1": 45.0},
            {"epoch": 3, "val_top1": 60.0, "test_top1": 55.0}, {"epoch": 4, "val_top1": 30.0, "test_top1": 70.0}]
    assert _chosen_by_validation(rows) == {"best_val_top1": 60.0, "best_val_epoch": 2, "test_top1_at_best_val": 45.0,
                                           "final_val_top1": 30.0}
    assert _chosen_by_validation([]) == {}
    assert _chosen_by_validation([{"epoch": 1, "test_top1": 40.0}]) == {}


def test_seed_everything_seeds_python_numpy_and_torch():
    loop.seed_everything(5)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())


def test_an_out_of_memory_message_without_detail_and_a_batch_of_one(small, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError()

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    with pytest.raises(FsamError) as error:
        run(small(trainer={"batch_size": 1}))
    assert str(error.value).startswith("out of memory on cpu with trainer.batch_size=1 (): use a smaller "
                                       "trainer.batch_size (e.g. 1), or trainer.micro_batches=2 to keep")


def test_each_process_checkpoints_its_own_fsam_ema_unless_the_clean_pass_is_synchronised():
    from types import SimpleNamespace

    model = nn.Linear(4, 3)
    fsam = loop.create_optimizer(model, "fsam", lr=0.1)
    loop.train_step(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), nn.CrossEntropyLoss(), fsam,
                    precision=Precision("off"))
    fsam.state[model.bias].pop("ema")  # a parameter without an EMA yet is kept as None

    def replica_state(optimizer, sync_clean_pass):
        trainer = SimpleNamespace(optimizer=optimizer,
                                  config=load_config({"trainer": {"sync_clean_pass": sync_clean_pass}}))
        return loop._Trainer._replica_state(trainer)

    own = replica_state(fsam, False)
    assert list(own) == ["ema"] and own["ema"][1] is None
    assert torch.equal(own["ema"][0], fsam.state[model.weight]["ema"]) and own["ema"][0].device.type == "cpu"
    assert replica_state(fsam, True) is None  # every replica has the same EMA
    assert replica_state(loop.create_optimizer(model, "sgd", lr=0.1), False) is None
    assert replica_state(loop.create_optimizer(model, "sam", lr=0.1), False) is None  # SAM keeps nothing of its own


def test_an_epoch_of_one_example_records_that_examples_loss_and_accuracy(small, monkeypatch):
    real = loop.train_step
    losses = []

    def right(model, inputs, targets, *args, **kwargs):  # the step's logits put the target first
        out = real(model, inputs, targets, *args, **kwargs)
        losses.append(out.loss.item())
        return dataclasses.replace(out, logits=F.one_hot(targets, 10).float())

    monkeypatch.setattr(loop, "train_step", right)
    config = small(dataset={"train_subset": 1}, trainer={"batch_size": 1, "epochs": 1})
    run(config)
    (row,) = metrics_of(config["run_dir"])
    assert row["train_loss"] == pytest.approx(losses[0], rel=1e-6)
    assert row["train_top1"] == 100.0


def test_the_summary_describes_the_data_as_built(small, monkeypatch):
    real = loop.build_data
    bundles = []
    monkeypatch.setattr(loop, "build_data", lambda *a, **k: bundles.append(real(*a, **k)) or bundles[-1])
    summary = run(small(trainer={"epochs": 1}))
    assert summary["data"] == bundles[0].info and summary["data"]


def test_a_checkpoint_of_more_processes_is_refused_by_their_number(small):
    config = small(trainer={"epochs": 1})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    (Path(config["run_dir"]) / "config.yaml").unlink()
    path = Path(config["run_dir"]) / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "processes": 2}, path)
    with pytest.raises(CheckpointError, match=r"another setting \(processes: 2 -> 1;"):
        run(config)
    del state["processes"]  # a checkpoint without the number: one entry per process in replicas
    torch.save({**state, "replicas": [None, None]}, path)
    with pytest.raises(CheckpointError, match=r"another setting \(processes: 2 -> 1;"):
        run(config)
    del state["config"], state["replicas"]
    torch.save(state, path)  # without a config: read as the default config, which differs in 19 keys
    with pytest.raises(CheckpointError, match=r"another setting \(dataset.augment.crop: true -> false; .*and 11 more\)"):
        run(config)


def fake_trainer(**changes):
    """What _Trainer's methods read of themselves, for calling one alone."""
    from types import SimpleNamespace

    saved = []
    trainer = SimpleNamespace(
        info=distributed.DistInfo(), device=torch.device("cpu"), saved=saved,
        totals=EpochTotals.from_plain({"loss_sum": 2.5, "correct": 3, "count": 4, "skipped": 1, "train_time_s": 1.5},
                                      torch.device("cpu")),
        folder=SimpleNamespace(lock=SimpleNamespace(check=lambda: None)),
        store=SimpleNamespace(save=lambda state, best: saved.append((state, best))),
        _replica_state=lambda: {"ema": ["mine"]},
        _state=lambda totals, replicas: {"totals": totals, "replicas": replicas},
    )
    for key, value in changes.items():
        setattr(trainer, key, value)
    return trainer


OWN_TOTALS = {"loss_sum": 2.5, "correct": 3, "count": 4, "skipped": 1, "train_time_s": 1.5}


def test_one_process_checkpoints_its_epoch_sums_and_no_replicas():
    trainer = fake_trainer()
    loop._Trainer._save(trainer)
    loop._Trainer._save(trainer, best=True)
    assert trainer.saved == [({"totals": OWN_TOTALS, "replicas": None}, False),
                             ({"totals": OWN_TOTALS, "replicas": None}, True)]


def test_under_ddp_rank_0_checkpoints_the_summed_epoch_and_each_process_own_state(monkeypatch):
    group = FakeGroup(monkeypatch, other=torch.tensor(5))  # the other process holds 5 in every sum
    trainer = fake_trainer(info=distributed.DistInfo(world_size=2))
    loop._Trainer._save(trainer)
    summed = {"loss_sum": 7.5, "correct": 8, "count": 9, "skipped": 6, "train_time_s": 1.5}
    assert trainer.saved == [({"totals": summed, "replicas": [{"totals": OWN_TOTALS, "method": {"ema": ["mine"]}},
                                                              "the other's"]}, False)]
    assert trainer.totals.to_plain() == OWN_TOTALS  # its own sums go on unchanged
    group.rank = 1
    other = fake_trainer(info=distributed.DistInfo(rank=1, world_size=2))
    loop._Trainer._save(other)
    assert other.saved == [] and group.calls[-1][0] == "gather_object"  # rank 1 joins the collectives only


def test_under_ddp_the_stop_signal_is_agreed_every_log_every_steps():
    from types import SimpleNamespace

    asked = []
    trainer = fake_trainer(
        info=distributed.DistInfo(world_size=2), progress=SimpleNamespace(global_step=3),
        config=load_config({"trainer": {"log_every": 2}}),
        stops=SimpleNamespace(received=signal.SIGTERM, agreed=lambda device: asked.append(device) or 12),
    )
    assert loop._Trainer._stop_requested(trainer) is None  # step 3: not a step to agree at
    trainer.progress.global_step = 4
    assert loop._Trainer._stop_requested(trainer) == 12 and asked == [torch.device("cpu")]
    single = fake_trainer(stops=trainer.stops, progress=trainer.progress, config=trainer.config)
    single.progress.global_step = 3
    assert loop._Trainer._stop_requested(single) == signal.SIGTERM  # one process: its own record, every step


def test_the_finite_check_returns_the_epoch_mean_loss_so_far():
    trainer = fake_trainer()
    assert loop._Trainer._check_finite(trainer) == 2.5 / 4
    trainer.totals = EpochTotals.from_plain({**OWN_TOTALS, "count": 1}, torch.device("cpu"))
    assert loop._Trainer._check_finite(trainer) == 2.5


def test_a_resumed_run_keeps_the_best_epoch_of_the_launch_before(small, monkeypatch):
    scripted = iter([75.0, 50.0])
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {**real(*a, **k), "test_top1": next(scripted)})
    config = small()
    interrupt_at_call(monkeypatch, config, 4)  # after epoch 1
    summary = run(config)
    assert (summary["best_top1"], summary["best_epoch"], summary["final_top1"]) == (75.0, 1, 50.0)
    assert checkpoint(config["run_dir"], "best.pt")["epoch"] == 1


def test_a_resumed_run_keeps_the_ema_measurements_of_its_epoch(small, monkeypatch):
    changes = {"optimizer": {"name": "fsam"}, "trainer": {"full_grad_analysis_every": 1, "checkpoint_every_steps": 2}}
    config = small(**changes)
    interrupt_at_call(monkeypatch, config, 3)  # after the checkpoint of step 2, which holds the measurement at 1
    assert [entry["step"] for entry in checkpoint(config["run_dir"])["analysis"]] == [1]
    run(config)
    assert [[entry["step"] for entry in row["analysis"]] for row in metrics_of(config["run_dir"])] == [[1, 2],
                                                                                                     [3, 4, 5]]


def test_under_ddp_each_process_resumes_its_own_partial_epoch_and_ema(small, monkeypatch):
    config = small(optimizer={"name": "fsam"}, trainer={"checkpoint_every_steps": 2})
    interrupt_at_call(monkeypatch, config, 3)
    path = Path(config["run_dir"]) / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    ema = [torch.full_like(state["model"][name], 0.5) for name in ("head.weight", "head.bias")]
    first = {"loss_sum": 4.0, "correct": 1, "count": 16, "skipped": 0, "train_time_s": 0.25}
    second = {"loss_sum": 1.0, "correct": 2, "count": 3, "skipped": 1, "train_time_s": 0.5}
    torch.save({**state, "processes": 2, "replicas": [{"totals": first, "method": None},
                                                       {"totals": second, "method": {"ema": ema}}]}, path)
    monkeypatch.setattr(distributed, "wrap", lambda model, info: model)

    def trainer(rank):
        return loop._Trainer(load_config(config), RunFolder(config["run_dir"]),
                             distributed.DistInfo(rank=rank, world_size=2))

    one, zero = trainer(1), trainer(0)
    assert one.resumed and one.totals.to_plain() == second and zero.totals.to_plain() == first
    assert all(torch.equal(one.optimizer.state[p]["ema"], e) for p, e in zip(one.model.parameters(), ema))
    assert not any(torch.equal(zero.optimizer.state[p]["ema"], e) for p, e in zip(zero.model.parameters(), ema))
    torch.save({**state, "processes": 2, "replicas": None}, path)  # no per-process record: rank 0 takes the sums
    assert trainer(0).totals.to_plain() == state["epoch_totals"]
    assert trainer(1).totals.to_plain() == {"loss_sum": 0.0, "correct": 0, "count": 0, "skipped": 0,
                                            "train_time_s": 0.0}


class FakeBar:
    """Stands for tqdm: records how the bar was made and what it was told."""

    made: list["FakeBar"] = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfixes, self.closed = kwargs, [], [], 0
        FakeBar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kwargs):
        self.postfixes.append(kwargs)

    def close(self):
        self.closed += 1


def test_the_progress_bar_counts_the_epoch_images_on_stderr_and_shows_loss_and_rate(small, monkeypatch):
    import sys

    FakeBar.made = []
    monkeypatch.setattr(loop, "tqdm", FakeBar)
    steps = record_steps(monkeypatch)
    run(small(trainer={"log_every": 2}))
    first, second = FakeBar.made
    common = {"total": 40, "initial": 0, "unit": "img", "unit_scale": True, "leave": False, "disable": None,
              "file": sys.stderr}
    assert first.kwargs == {**common, "desc": "epoch 1/2"} and second.kwargs == {**common, "desc": "epoch 2/2"}
    assert first.updates == second.updates == [16, 16, 8] and first.closed == second.closed == 1
    mean = (16 * steps[0]["loss"] + 16 * steps[1]["loss"]) / 32
    assert first.postfixes == [{"loss": f"{mean:.4f}", "lr": f"{LR * cosine(2, 6):.4g}"}]  # after step 2
    assert [postfix["lr"] for postfix in second.postfixes] == [f"{LR * cosine(4, 6):.4g}", f"{0.0:.4g}"]


def test_the_progress_bar_of_a_resumed_epoch_starts_at_its_batch(small, monkeypatch):
    FakeBar.made = []
    monkeypatch.setattr(loop, "tqdm", FakeBar)
    config = small(trainer={"checkpoint_every_steps": 2})
    interrupt_at_call(monkeypatch, config, 3)
    run(config)
    resumed = FakeBar.made[1]
    assert (resumed.kwargs["initial"], resumed.kwargs["total"], resumed.updates) == (32, 40, [8])


@pytest.mark.parametrize("checkpoint_every", [1, 0])
def test_the_epoch_time_adds_up_the_training_between_checkpoints_and_signals(small, monkeypatch, checkpoint_every):
    """A clock that advances 10 s per training step: each epoch of 3 steps trains for 30 s, however often it is
    cut by checkpoints (every step, or none) and a signal handed to an earlier handler."""
    from types import SimpleNamespace

    clock = {"now": 0.0}
    real = loop.train_step

    def ten_seconds(*args, **kwargs):
        clock["now"] += 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", ten_seconds)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    signal_after = {"n": 0}
    timed = loop.train_step

    def then_signal(*args, **kwargs):
        out = timed(*args, **kwargs)
        signal_after["n"] += 1
        if signal_after["n"] == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(loop, "train_step", then_signal)
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        config = small(trainer={"checkpoint_every_steps": checkpoint_every})
        summary = run(config)
    finally:
        signal.signal(signal.SIGUSR2, before)
    rows = metrics_of(config["run_dir"])
    assert [row["epoch_time_s"] for row in rows] == [30.0, 30.0]
    assert [row["images_per_s"] for row in rows] == [40 / 30, 40 / 30]
    assert (summary["train_time_s"], summary["wall_time_s"]) == (60.0, 60.0)


def test_wandb_hears_of_a_run_out_of_memory_as_failed(small, monkeypatch, fake_wandb):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    with pytest.raises(FsamError):
        run(small())
    assert fake_wandb[0].exit_codes == [1]


def test_the_schedule_of_a_run_warms_up_from_warmup_lr_to_the_optimizer_rate(small, monkeypatch):
    steps = record_steps(monkeypatch)
    run(small(schedule={"warmup_epochs": 1, "warmup_lr": 0.004}, trainer={"epochs": 2}))
    # 3 warmup steps from 0.004 to 0.01, then a cosine over the 3 others
    assert [step["lr"] for step in steps] == pytest.approx([0.004, 0.006, 0.008, 0.01, 0.0075, 0.0025])


def test_the_model_gets_its_pretrained_weights_channels_last_and_a_forward_check(small, built, monkeypatch):
    checked = []
    monkeypatch.setattr(loop, "check_forward", lambda model, size, kwargs: checked.append((type(model), size, kwargs)))
    run(small(model={"name": "resnet18", "kwargs": {"dropout": 0.0}, "pretrained_path": "weights.pt"},
              trainer={"epochs": 1, "channels_last": True}))
    assert built[0]["pretrained_path"] == "weights.pt"
    assert checked == [(TinyNet, 32, {"dropout": 0.0})]


def test_a_folder_of_more_processes_in_config_yaml_is_refused_by_their_number(small):
    import yaml

    config = small(trainer={"epochs": 1})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    path = Path(config["run_dir"]) / "config.yaml"
    record = yaml.safe_load(path.read_text())
    record["identity"]["processes"] = 2
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    with pytest.raises(CheckpointError, match=r"^" + config["run_dir"] + r" holds a run of another setting \(processes: 2 -> 1"):
        run(config)


def test_a_diverged_status_without_a_message_points_to_status_json(small):
    config = small()
    Path(config["run_dir"]).mkdir(parents=True)
    (Path(config["run_dir"]) / "status.json").write_text('{"status": "diverged"}')
    with pytest.raises(DivergedError) as error:
        run(config)
    assert str(error.value).startswith(f"{config['run_dir']} diverged in an earlier launch (see status.json); it is")


def test_a_checkpoint_written_before_the_ema_measurements_existed_resumes_with_none(small, monkeypatch):
    config = small(trainer={"checkpoint_every_steps": 2})
    interrupt_at_call(monkeypatch, config, 3)
    last = Path(config["run_dir"]) / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["analysis"]  # the format before trainer.full_grad_analysis_every
    torch.save(state, last)
    summary = run(config)
    assert summary["status"] == "finished" and all("analysis" not in row for row in metrics_of(config["run_dir"]))


def test_the_data_url_and_checksum_of_the_config_reach_the_data(small, monkeypatch):
    asked = {}

    def build_data(name, root, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loop, "build_data", build_data)
    with pytest.raises(RuntimeError, match="stop here"):
        run(small(dataset={"url": "https://mirror.example/cifar-10-python.tar.gz", "md5": "0" * 32}))
    assert (asked["url"], asked["md5"]) == ("https://mirror.example/cifar-10-python.tar.gz", "0" * 32)


def test_the_summary_says_how_well_the_final_weights_fit_the_training_labels_noisy_and_clean(small):
    """Eval mode, no augmentation: the share of training images the final weights label as trained (noisy labels
    included) and, with label noise, as they truly are; the difference is how much of the noise was fitted."""
    config = small(trainer={"epochs": 1}, dataset={"noise": {"kind": "symmetric", "ratio": 0.5, "seed": 4}})
    summary = run(config)
    weights = checkpoint(config["run_dir"])["model"]
    model = TinyNet(10)
    model.load_state_dict(weights)
    model.eval()
    from fsam.data import NoiseSpec, build_data

    noisy = build_data("cifar10", config["dataset"]["root"], batch_size=16, download=False, train_subset=40,
                       noise=NoiseSpec("symmetric", 0.5, 4), drop_last=False)
    clean = build_data("cifar10", config["dataset"]["root"], batch_size=16, download=False, train_subset=40,
                       drop_last=False)

    def top1(bundle) -> float:
        with torch.no_grad():
            pairs = [(model(images).argmax(1), labels) for images, labels in bundle.train_in_order.iterate(0)]
        return 100.0 * sum(int((guess == labels).sum()) for guess, labels in pairs) / 40

    assert summary["train_fit_top1"] == pytest.approx(top1(noisy), abs=1e-9)
    assert summary["train_clean_top1"] == pytest.approx(top1(clean), abs=1e-9)
    assert summary["train_fit_top1"] != summary["train_clean_top1"]  # half the labels changed
    without_noise = run(small(run_dir=config["run_dir"] + "-clean", trainer={"epochs": 1}))
    assert "train_fit_top1" in without_noise and "train_clean_top1" not in without_noise
