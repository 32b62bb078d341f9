"""The engine without Hydra: the loop's records, checkpoints and exact resume, divergence, schedules, evaluation,
and a wandb mirror that never stops a run. Runs are tiny: 64 CIFAR-format images, 4 steps per epoch, CPU."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

import fsam.engine.loop as loop
from conftest import metrics_of, stop_at_call, without_times
from fsam.config import ScheduleConfig, load_config
from fsam.engine import CheckpointStore, RunFolder, create_schedule, evaluate, run
from fsam.engine.evaluate import topk_correct
from fsam.engine.loop import precision_mode
from fsam.runfolder import write_atomic, write_json_atomic
from fsam.engine.wandb_mirror import resolve_mode
from fsam.errors import CheckpointError, DivergedError
from fsam.optim import Precision, create_optimizer

def saved_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


# ------------------------------------------------------------------------------------------------ records


def test_a_plain_dict_config_trains_and_writes_every_record(tiny_config):
    config = tiny_config()
    summary = run(config)
    folder = Path(config["run_dir"])
    rows = metrics_of(folder)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [row["step"] for row in rows] == [4, 8]
    for key in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "images_per_s",
                "skipped_steps", "epoch_time_s", "wall_time_s"):
        assert all(key in row for row in rows)
    assert rows[-1]["lr"] == 0.0  # cosine to 0 at the last step
    assert summary["status"] == "finished"
    assert summary["final_top1"] == rows[-1]["test_top1"]
    assert summary["best_top1"] == max(row["test_top1"] for row in rows)
    assert summary["seed"] == 1 and summary["device"] == "cpu" and summary["global_steps"] == 8
    assert summary["images_per_s"] > 0 and summary["wall_time_s"] > 0
    assert "torch" in summary["versions"] and "git_commit" in summary
    assert json.loads((folder / "summary.json").read_text()) == json.loads(json.dumps(summary))
    recorded, identity = RunFolder(folder).read_config()
    assert load_config(recorded) == load_config(config)
    assert identity["setting"] == summary["setting"] and identity["digest"].startswith(summary["setting"][-12:])
    assert identity["model"]["parameters"] == summary["model"]["parameters"] > 0
    checkpoints = {path.name for path in (folder / "checkpoints").iterdir()}
    assert checkpoints == {"last.pt", "last.prev.pt", "best.pt", "final.pt"}
    # final.pt: the final weights alone, a plain state_dict in float32, equal to the last checkpoint's model
    final = torch.load(folder / "checkpoints" / "final.pt", weights_only=True)
    last = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert list(final) == list(last) and all(torch.equal(final[key], last[key]) for key in last)
    assert {tensor.dtype for tensor in final.values() if tensor.is_floating_point()} == {torch.float32}
    assert not [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def test_summary_is_the_last_file_written(tiny_config):
    config = tiny_config()
    run(config)
    folder = Path(config["run_dir"])
    summary_time = (folder / "summary.json").stat().st_mtime_ns
    others = [path for path in folder.rglob("*") if path.is_file() and path.name != "summary.json"]
    assert all(path.stat().st_mtime_ns <= summary_time for path in others)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"status": "old"})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"status": object()})
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert json.loads(target.read_text()) == {"status": "old"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]


def test_relaunching_a_finished_run_skips_it_without_training(tiny_config, monkeypatch, capsys):
    config = tiny_config()
    first = run(config)
    summary_file = Path(config["run_dir"]) / "summary.json"
    written = summary_file.stat().st_mtime_ns
    stop_at_call(monkeypatch, 1, AssertionError("a finished run must not train again"))
    assert run(config) == json.loads(json.dumps(first))
    assert "skipped" in capsys.readouterr().out
    assert summary_file.stat().st_mtime_ns == written


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["sgd", "fsam"])
def test_a_run_killed_mid_epoch_resumes_exactly_where_it_stopped(tiny_config, tmp_path, monkeypatch, method):
    changes = {"optimizer": {"name": method}, "trainer": {"checkpoint_every_steps": 2}}
    reference = tiny_config(run_dir=str(tmp_path / "reference"), **changes)
    run(reference)

    interrupted = tiny_config(run_dir=str(tmp_path / "interrupted"), **changes)
    stop_at_call(monkeypatch, 7, KeyboardInterrupt())  # during epoch 2; the last checkpoint is after step 6
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    assert not (tmp_path / "interrupted" / "summary.json").exists()
    state = torch.load(tmp_path / "interrupted" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 2, 6)
    monkeypatch.undo()

    run(interrupted)
    assert without_times(metrics_of(tmp_path / "interrupted")) == without_times(metrics_of(tmp_path / "reference"))
    resumed, straight = saved_weights(tmp_path / "interrupted"), saved_weights(tmp_path / "reference")
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_a_checkpoint_holds_the_whole_state_and_loads_without_pickled_code(tiny_config):
    config = tiny_config(trainer={"epochs": 1})
    run(config)
    state = torch.load(Path(config["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "schedule", "precision", "epoch", "batch", "global_step", "epoch_totals",
                "best_top1", "metrics", "wall_time_s", "rng", "wandb_id", "config"):
        assert key in state
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 0, 4)
    assert state["schedule"]["last_epoch"] == 4
    assert state["optimizer"]["base"]["state"], "the base optimizer's momentum must be saved"
    assert state["optimizer"]["method_state"] and state["optimizer"]["steps_taken"] == 4  # F-SAM's EMA, steps


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(tiny_config, capsys):
    config = tiny_config()
    run(config)
    folder = Path(config["run_dir"])
    finished = metrics_of(folder)
    (folder / "summary.json").unlink()
    (folder / "checkpoints" / "last.pt").write_bytes(b"torn write")
    summary = run(config)  # resumes from the end of epoch 1 and redoes epoch 2
    assert "last.pt is unreadable" in capsys.readouterr().err
    assert summary["status"] == "finished"
    assert without_times(metrics_of(folder)) == without_times(finished)


def test_no_readable_checkpoint_is_a_checkpoint_error(tiny_config):
    config = tiny_config(trainer={"epochs": 1})
    run(config)
    folder = Path(config["run_dir"])
    (folder / "summary.json").unlink()
    for name in ("last.pt", "last.prev.pt"):
        (folder / "checkpoints" / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        run(config)


def test_checkpoint_store_keeps_the_previous_last_and_the_best(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save({"model": {}, "n": 1}, best=True)
    store.save({"model": {}, "n": 2})
    store.save({"model": {}, "n": 3})

    def number(path):
        return torch.load(path, weights_only=True)["n"]

    assert (number(store.last), number(store.previous), number(store.best)) == (3, 2, 1)
    assert store.load_latest()["n"] == 3


# ------------------------------------------------------------------------------------------- divergence


def test_a_nan_loss_stops_the_run_marks_it_diverged_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    config = tiny_config()
    real = loop.train_step
    calls = {"n": 0}

    def nan_in_epoch_two(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 6:
            out.loss = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(loop, "train_step", nan_in_epoch_two)
    with pytest.raises(DivergedError, match="diverged: the loss became nan in epoch 2"):
        run(config)
    folder = Path(config["run_dir"])
    assert not (folder / "summary.json").exists()
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "diverged" and status["epoch"] == 2
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert len(metrics_of(folder)) == 1


def test_a_diverged_run_is_not_retrained_on_relaunch_and_says_so(tiny_config, monkeypatch):
    config = tiny_config()
    folder = RunFolder(config["run_dir"])
    folder.path.mkdir(parents=True)
    folder.write_status({"status": "diverged", "message": "training diverged: test"})
    stop_at_call(monkeypatch, 1, AssertionError("a diverged run must not train again"))
    with pytest.raises(DivergedError, match="diverged in an earlier launch .training diverged: test.; it is not"):
        run(config)


# -------------------------------------------------------------------------------------------- schedules


def schedule_lrs(config: ScheduleConfig, *, steps_per_epoch: int, epochs: int, lr: float = 0.1) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer = create_optimizer(model, "fsam", lr=lr)
    schedule = create_schedule(optimizer, config, lr=lr, steps_per_epoch=steps_per_epoch, epochs=epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs + 1):
        lrs.append(optimizer.base_optimizer.param_groups[0]["lr"])
        optimizer.base_optimizer.step()
        schedule.step()
    return lrs


def test_cosine_is_stepped_every_iteration_down_to_zero():
    lrs = schedule_lrs(ScheduleConfig(name="cosine"), steps_per_epoch=10, epochs=3)
    total = 30
    for step in range(total + 1):
        assert lrs[step] == pytest.approx(0.05 * (1 + math.cos(math.pi * step / total)), abs=1e-12)
    assert lrs[1] < lrs[0]  # changes inside the first epoch, not only at epoch ends
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)


def test_warmup_rises_linearly_from_warmup_lr_then_the_cosine_starts_at_lr():
    lrs = schedule_lrs(ScheduleConfig(name="cosine", warmup_epochs=1, warmup_lr=0.01), steps_per_epoch=10, epochs=3)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[5] == pytest.approx(0.055)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.05)  # halfway through the 20 cosine steps
    assert lrs[30] == pytest.approx(0.0, abs=1e-12)


def test_multistep_milestones_are_epochs_converted_to_steps():
    lrs = schedule_lrs(ScheduleConfig(name="multistep", milestones=[1, 2], gamma=0.1), steps_per_epoch=10, epochs=3)
    assert lrs[:10] == pytest.approx([0.1] * 10)
    assert lrs[10:20] == pytest.approx([0.01] * 10)
    assert lrs[20:30] == pytest.approx([0.001] * 10)


def test_the_schedule_drives_the_base_optimizer_of_a_wrapper():
    model = nn.Linear(2, 2)
    optimizer = create_optimizer(model, "sam", lr=0.1)
    schedule = create_schedule(optimizer, ScheduleConfig(), lr=0.1, steps_per_epoch=2, epochs=1)
    assert schedule.optimizer is optimizer.base_optimizer


# ------------------------------------------------------------------------------------------- evaluation


def test_topk_counts_a_row_when_the_target_is_among_the_k_best():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 1, 0])
    assert topk_correct(logits, targets, (1, 2, 5)).tolist() == [1, 2, 3]


class ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def iterate(self, epoch, start_batch=0):
        return iter(self.batches[start_batch:])


def test_evaluate_gives_mean_loss_and_percent_accuracy_over_all_batches():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    inputs = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    targets = torch.tensor([0, 1, 0, 2])  # rows 0 and 1 right
    loader = ListLoader([(inputs[:3], targets[:3]), (inputs[3:], targets[3:])])
    result = evaluate(model, loader, Precision("off"), torch.device("cpu"))
    expected_loss = nn.functional.cross_entropy(model(inputs), targets).item()
    assert result["test_loss"] == pytest.approx(expected_loss)
    assert result["test_top1"] == pytest.approx(50.0)
    assert result["test_top5"] == pytest.approx(100.0)
    assert not model.training


# ------------------------------------------------------------------------------------ precision, wandb


def test_bf16_runs_as_float32_on_the_cpu_with_a_note_and_other_modes_are_kept():
    mode, note = precision_mode("bf16", torch.device("cpu"))
    assert mode == "off" and "bf16" in note
    assert precision_mode("fp16", torch.device("cpu")) == ("fp16", None)
    assert precision_mode("off", torch.device("cpu")) == ("off", None)


def test_wandb_auto_mode_is_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    mode, reason = resolve_mode("auto")
    assert mode == "offline" and "not logged in" in reason
    mode, reason = resolve_mode("online")
    assert mode == "offline" and "not logged in" in reason
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == ("offline", None)
    assert resolve_mode("offline") == ("offline", None)


def test_wandb_with_a_key_but_an_unreachable_server_is_offline(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    mode, reason = resolve_mode("online")
    assert mode == "offline" and f"127.0.0.1:{closed_port} is unreachable" in reason


def test_a_failing_wandb_prints_one_warning_and_the_run_finishes(tiny_config, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken_init)
    config = tiny_config(trainer={"epochs": 1}, logger={"backend": "wandb", "mode": "offline"})
    assert run(config)["status"] == "finished"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: wandb")]
    assert len(warnings) == 1 and "no service" in warnings[0]
    assert (Path(config["run_dir"]) / "summary.json").exists()


def test_label_noise_is_one_data_set_for_every_seed_or_drawn_from_each_seed(tiny_config, tmp_path):
    def noise_record(name: str, seed: int, noise_seed: int | None) -> dict:
        config = tiny_config(run_dir=str(tmp_path / name), trainer={"epochs": 1, "seed": seed},
                             dataset={"noise": {"kind": "symmetric", "ratio": 0.5, "seed": noise_seed}})
        return run(config)["data"]["label_noise"]

    fixed = [noise_record(f"fixed{seed}", seed, 0) for seed in (1, 2)]
    assert [record["seed"] for record in fixed] == [0, 0]
    drawn = [noise_record(f"drawn{seed}", seed, None) for seed in (1, 2)]
    assert [record["seed"] for record in drawn] == [1, 2]  # the release's way: each seed its own noisy labels
