"""``python train.py`` as a user runs it: real subprocesses, real configs, tiny generated CIFAR archives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wandb_records import read_run


def finished_runs(runs: Path) -> dict[Path, dict]:
    return {path.parent: json.loads(path.read_text()) for path in runs.rglob("summary.json")}


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sgd", "sam", "asam", "fsam"])
def test_one_epoch_of_each_method_through_the_command_line(method, train_py, tiny_cli, isolated_records):
    result = train_py(f"optimizer={method}", *tiny_cli)
    assert result.returncode == 0, result.stderr
    (run_dir, summary), = finished_runs(isolated_records).items()
    assert run_dir.parent.parent == isolated_records and run_dir.name == "seed1"
    assert run_dir.parent.name.startswith(f"cifar10-pyramidnet8-{method}-")
    assert summary["setting"] == run_dir.parent.name
    assert summary["status"] == "finished" and summary["method"] == method and summary["epochs"] == 1
    assert len(metrics_of(run_dir)) == 1
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.pt").exists()
    assert f"records: {run_dir}" in result.stdout


def test_a_multirun_sweep_makes_one_run_folder_per_job_that_single_runs_find_again(train_py, tiny_cli, isolated_records):
    result = train_py("-m", "optimizer=sgd,fsam", *tiny_cli)
    assert result.returncode == 0, result.stderr
    assert "sweep: 1 of 2 jobs done (1 finished)" in result.stdout and "about " in result.stdout
    assert "sweep: 2 of 2 jobs done (2 finished)" in result.stdout
    runs = finished_runs(isolated_records)
    assert sorted(summary["method"] for summary in runs.values()) == ["fsam", "sgd"]
    sgd_folder = next(folder for folder, summary in runs.items() if summary["method"] == "sgd")
    again = train_py("optimizer=sgd", *tiny_cli)
    assert again.returncode == 0, again.stderr
    assert f"skipped: {sgd_folder} is finished" in again.stdout


def test_the_quickstart_runs_and_says_where_its_records_are(train_py, isolated_records):
    result = train_py("experiment=quickstart", "trainer.epochs=1", "dataset.train_subset=256", "trainer.device=cpu")
    assert result.returncode == 0, result.stderr
    (run_dir, summary), = finished_runs(isolated_records).items()
    assert run_dir.parent.name.startswith("digits-pyramidnet8-fsam-") and run_dir.name == "seed1"
    assert f"records: {run_dir}" in result.stdout
    assert summary["data"]["dataset"] == "digits" and summary["data"]["num_train"] == 256
    assert len(metrics_of(run_dir)) == 1


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["model=lenet"], "model=lenet is not an option of model: choose one of deit_small, mlp, pyramidnet110, resnet18"),
        (["optimizer=sgd,adam"], "optimizer=adam is not an option of optimizer: choose one of asam, fasam, fsam, sam, sgd"),
        (["model.name=lenet"], "model.name='lenet' is not a model: choose one of deit_small"),
        (["optimizer.rho=-1"], "optimizer.rho=-1.0 is not allowed: must be > 0"),
        (["trainer.amp=fp32"], "trainer.amp='fp32' is not allowed: use one of bf16, fp16, off"),
        (["trainer.epoch=3"], "trainer.epoch is not a known key (did you mean epochs?): the keys under trainer are"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(arguments, expected, train_py, tiny_cli, isolated_records):
    result = train_py(*tiny_cli, *arguments)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(isolated_records.rglob("summary.json"))


def test_missing_data_is_a_user_error(train_py, tiny_cli, tmp_path):
    result = train_py(*tiny_cli, f"dataset.root={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: CIFAR-10 not found") and "Traceback" not in result.stderr


def test_wandb_offline_writes_its_files_in_the_run_folder(train_py, tiny_cli, isolated_records):
    result = train_py("logger=wandb", "logger.mode=offline", *tiny_cli, "trainer.log_every=1")
    assert result.returncode == 0, result.stderr
    (run_dir, _), = finished_runs(isolated_records).items()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    wandb_id = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["wandb_id"]
    assert (offline_runs[0] / f"run-{wandb_id}.wandb").exists()
    assert "warning" not in result.stderr
    # what wandb sync would upload: named and grouped by the setting, per-step loss and lr, epochs under test/
    record = read_run(offline_runs[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert record["run"].run_group == summary["setting"]
    assert record["run"].display_name == f"{summary['setting']}-seed1"
    steps = [row for row in record["history"] if "train/loss" in row]
    assert [row["_step"] for row in steps] == [1, 2, 3, 4]  # log_every=1, 4 steps
    lrs = [row["train/lr"] for row in steps]  # the rate each step trained with: cosine from 0.05, never 0
    assert lrs[0] == 0.05 and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0
    (epoch,) = [row for row in record["history"] if "test/top1" in row]
    assert epoch["test/top1"] == metrics_of(run_dir)[0]["test_top1"] and epoch["_step"] == 4
    assert record["summary"]["model"]["parameters"] == summary["model"]["parameters"]  # nested values kept
    assert record["config"]["identity"]["setting"] == summary["setting"]
    assert "epoch 1/1" in (offline_runs[0] / "files" / "output.log").read_text()  # the console, uploaded
    assert result.stdout.splitlines()[-1] == (f"wandb: the run logged offline to {offline_runs[0]}; upload with: "
                                              f"wandb sync {offline_runs[0]}")


def test_relaunching_a_finished_run_skips_it(train_py, tiny_cli, isolated_records):
    assert train_py(*tiny_cli).returncode == 0
    (run_dir, _), = finished_runs(isolated_records).items()
    written = (run_dir / "summary.json").stat().st_mtime_ns
    again = train_py(*tiny_cli)
    assert again.returncode == 0
    assert f"skipped: {run_dir} is finished" in again.stdout and "epoch 1/1" not in again.stdout
    assert (run_dir / "summary.json").stat().st_mtime_ns == written


def test_relaunching_an_interrupted_run_continues_from_its_checkpoint(train_py, tiny_cli, isolated_records):
    two_epochs = [*tiny_cli, "trainer.epochs=2"]
    assert train_py(*two_epochs).returncode == 0
    (run_dir, _), = finished_runs(isolated_records).items()
    straight = metrics_of(run_dir)
    # Make the folder look like a run killed just before its last checkpoint: the state after epoch 1, no
    # summary, and a metrics line that the checkpoint has not seen.
    (run_dir / "summary.json").unlink()
    checkpoints = run_dir / "checkpoints"
    shutil.move(checkpoints / "last.prev.pt", checkpoints / "last.pt")
    resumed = train_py(*two_epochs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 1/2" not in resumed.stdout and "epoch 2/2" in resumed.stdout
    rows = metrics_of(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("step", "train_loss", "test_loss", "test_top1", "test_top5", "lr"):
        assert rows[1][key] == straight[1][key]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_two_processes_under_torchrun_train_one_run_with_one_set_of_records(tiny_cli, isolated_records):
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(repo / "train.py"), *tiny_cli, "trainer.batch_size=8"]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    (run_dir, summary), = finished_runs(isolated_records).items()
    assert summary["world_size"] == 2 and summary["global_steps"] == 4  # 64 images, 2 x 8 per step
    assert summary["data"]["train_per_rank"] == 32
    assert result.stdout.count("records:") == 1  # only the first process reports and writes
    assert len(metrics_of(run_dir)) == 1


def test_a_sweep_through_submitits_local_launcher_writes_the_folders_single_runs_find(train_py, tiny_cli, isolated_records):
    """Each job's real outcome as it ends: a job whose folder another launch holds is refused, never 'finished',
    and the sweep exits with status 2 naming it."""
    from fsam.runfolder import RunFolder, default_run_dir
    from test_sweeps import composed

    holder = RunFolder(default_run_dir(composed(*tiny_cli, "optimizer=asam"), 1))
    holder.hold()
    try:
        result = train_py("-m", "hydra/launcher=local", "optimizer=sgd,fsam,asam", *tiny_cli, timeout=600)
    finally:
        holder.release()
    assert result.returncode == 2, result.stderr
    logs = [line.rsplit(": log ", 1)[1] for line in result.stdout.splitlines() if ": log " in line]
    assert len(logs) == 3 and all("epoch 1/1" in Path(log).read_text() for log in logs[:2])  # where each job's log is
    ended = sorted(line.split(";")[0] for line in result.stdout.splitlines() if line.startswith("job #") and ": log " not in line)
    assert [line.split(") ", 1)[1].split(":")[0] for line in ended] == ["finished", "finished", "refused"]
    assert "is in use by pid" in ended[2] and "sweep: 3 of 3 jobs done (2 finished, 1 refused)" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 jobs of this sweep did not finish: job #2 (")
    runs = finished_runs(isolated_records)
    assert sorted(summary["method"] for summary in runs.values()) == ["fsam", "sgd"]
    fsam_folder = next(folder for folder, summary in runs.items() if summary["method"] == "fsam")
    again = train_py("optimizer=fsam", *tiny_cli)
    assert f"skipped: {fsam_folder} is finished" in again.stdout
