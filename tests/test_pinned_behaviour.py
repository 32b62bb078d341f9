"""Behaviour of the training loop that a plausible one-line slip would break without any other test noticing.

Each test here was checked against such a slip planted in the source (issue 13): restoring no random state on
resume, stepping the schedule before the optimizer, averaging batch means without their sizes, marking every
epoch's checkpoint as the best, swapping best and final accuracy, dropping ``trainer.label_smoothing`` on its
way to the loss. Runs are tiny: 64 CIFAR-format images in steps of 16, CPU, float32.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import fsam.engine.loop as loop
from conftest import metrics_of, stop_at_call, without_times
from fsam.engine import run

STEPS_PER_EPOCH = 4  # 64 training images in batches of 16 (tiny_config)


def checkpoint(run_dir, name: str) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / name, weights_only=True)


def record_steps(monkeypatch) -> list[dict]:
    """Wrap the loop's train_step; each call appends what the step saw and returned: the learning rate of every
    param group when it began, the targets, and the clean pass's loss and logits."""
    real = loop.train_step
    steps: list[dict] = []

    def recording(model, inputs, targets, loss_fn, optimizer, **kwargs):
        lrs = [group["lr"] for group in optimizer.param_groups]
        out = real(model, inputs, targets, loss_fn, optimizer, **kwargs)
        steps.append({"lrs": lrs, "targets": targets.clone(), "loss": out.loss.item(), "logits": out.logits.clone()})
        return out

    monkeypatch.setattr(loop, "train_step", recording)
    return steps


# ------------------------------------------------------------------------------------- resume and randomness


# timm's smallest ResNet (0.37M parameters) with dropout before its head: every training forward draws from
# torch's global generator, which the data loaders never touch, so only the checkpoint's random state keeps the
# masks of a resumed run equal to those of the run that was never stopped.
DROPOUT_MODEL = {"name": "timm:test_resnet", "kwargs": {"drop_rate": 0.3}}


def test_a_run_with_dropout_killed_mid_epoch_resumes_bit_for_bit(tiny_config, tmp_path, monkeypatch):
    changes = {"model": DROPOUT_MODEL, "trainer": {"checkpoint_every_steps": 2}}
    reference = tiny_config(run_dir=str(tmp_path / "reference"), **changes)
    run(reference)

    interrupted = tiny_config(run_dir=str(tmp_path / "interrupted"), **changes)
    stop_at_call(monkeypatch, 7, KeyboardInterrupt())  # in epoch 2, after the checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    assert checkpoint(tmp_path / "interrupted", "last.pt")["global_step"] == 6
    monkeypatch.undo()
    run(interrupted)

    assert without_times(metrics_of(tmp_path / "interrupted")) == without_times(metrics_of(tmp_path / "reference"))
    resumed = checkpoint(tmp_path / "interrupted", "last.pt")["model"]
    straight = checkpoint(tmp_path / "reference", "last.pt")["model"]
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


# --------------------------------------------------------------------------------------------- learning rate


def test_each_step_trains_with_the_cosine_rate_of_its_own_step(tiny_config, monkeypatch):
    steps = record_steps(monkeypatch)
    lr, epochs = 0.05, 2
    run(tiny_config(optimizer={"lr": lr}, trainer={"epochs": epochs}))
    total = STEPS_PER_EPOCH * epochs
    expected = [0.5 * lr * (1 + math.cos(math.pi * step / total)) for step in range(total)]
    assert [step["lrs"][0] for step in steps] == pytest.approx(expected, abs=1e-12)
    assert steps[0]["lrs"][0] == lr and steps[-1]["lrs"][0] > 0  # the rate reaches 0 only after the last step


# ---------------------------------------------------------------------------------------- training records


class UnevenBatches:
    """A training loader whose batch ``n`` of every epoch is cut to ``sizes[n]`` examples: a stand-in for any
    data path whose batches differ in size, which an epoch mean must weight by their sizes."""

    def __init__(self, loader, sizes: list[int]) -> None:
        self.loader, self.sizes = loader, sizes

    def __len__(self) -> int:
        return len(self.loader)

    def iterate(self, epoch: int, start_batch: int = 0):
        for number, (inputs, targets) in enumerate(self.loader.iterate(epoch, start_batch), start_batch):
            yield inputs[: self.sizes[number]], targets[: self.sizes[number]]


def test_the_recorded_train_loss_and_top1_weight_each_step_by_its_batch_size(tiny_config, monkeypatch):
    sizes = [16, 12, 4, 2]
    real_build = loop.build_data

    def uneven_build(*args, **kwargs):
        bundle = real_build(*args, **kwargs)
        return dataclasses.replace(bundle, train=UnevenBatches(bundle.train, sizes))

    monkeypatch.setattr(loop, "build_data", uneven_build)
    steps = record_steps(monkeypatch)
    config = tiny_config()
    run(config)

    rows = metrics_of(config["run_dir"])
    assert [len(step["targets"]) for step in steps] == sizes * 2
    for epoch, row in enumerate(rows):
        epoch_steps = steps[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]
        examples = sum(len(step["targets"]) for step in epoch_steps)
        loss = sum(step["loss"] * len(step["targets"]) for step in epoch_steps) / examples
        correct = sum(int((step["logits"].argmax(1) == step["targets"]).sum()) for step in epoch_steps)
        assert row["train_loss"] == pytest.approx(loss, rel=1e-6)
        assert row["train_top1"] == pytest.approx(100.0 * correct / examples, rel=1e-9)
        unweighted = sum(step["loss"] for step in epoch_steps) / len(epoch_steps)
        assert abs(unweighted - loss) > 1e-4, "the sizes must change the mean, or this test proves nothing"


def test_the_recorded_train_loss_is_the_loss_with_label_smoothing(tiny_config, monkeypatch):
    steps = record_steps(monkeypatch)
    run(tiny_config(trainer={"epochs": 1, "label_smoothing": 0.3}))
    for step in steps:
        logits, targets = step["logits"].float(), step["targets"]
        smoothed = F.cross_entropy(logits, targets, label_smoothing=0.3).item()
        assert step["loss"] == pytest.approx(smoothed, rel=1e-5)
        assert abs(F.cross_entropy(logits, targets).item() - smoothed) > 1e-3


# ------------------------------------------------------------------------------------------- best and final


def test_best_checkpoint_and_summary_keep_the_best_epoch_when_accuracy_peaks_before_the_end(
    tiny_config, monkeypatch
):
    scripted_top1 = iter([50.0, 75.0, 25.0])  # epoch 2 is the best, epoch 3 the last
    real_evaluate = loop.evaluate

    def scripted_evaluate(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "test_top1": next(scripted_top1)}

    monkeypatch.setattr(loop, "evaluate", scripted_evaluate)
    config = tiny_config(dataset={"train_subset": 32}, trainer={"epochs": 3})  # 2 steps per epoch
    summary = run(config)

    assert [row["test_top1"] for row in metrics_of(config["run_dir"])] == [50.0, 75.0, 25.0]
    assert (summary["best_top1"], summary["best_epoch"], summary["final_top1"]) == (75.0, 2, 25.0)
    best, last = checkpoint(config["run_dir"], "best.pt"), checkpoint(config["run_dir"], "last.pt")
    assert (best["epoch"], best["global_step"], best["best_top1"]) == (2, 4, 75.0)
    assert (last["epoch"], last["global_step"]) == (3, 6)
    assert any(not torch.equal(best["model"][name], last["model"][name]) for name in last["model"])
