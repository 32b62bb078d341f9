"""Surviving the cluster: SIGKILL at a random step, stop signals, requeue hand-off, relaunched sweeps, foreign
checkpoints. Kill tests use real ``python train.py`` subprocesses and real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fsam.engine.loop as loop
from conftest import TINY_MODEL_CLI
from fsam.engine import run
from fsam.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TIMES = ("images_per_s", "epoch_time_s", "wall_time_s")


def metrics_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMES} for row in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def the_run_folder(runs: Path) -> Path:
    folders = {path.parent.parent for path in runs.rglob("checkpoints/last.pt")}
    assert len(folders) == 1, folders
    return folders.pop()


def saved_step(run_dir: Path) -> int:
    """The global step of the newest checkpoint, -1 while none can be read (not yet written, or being renamed)."""
    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


def launch(arguments: list[str], runs: Path) -> subprocess.Popen:
    env = {**os.environ, "FSAM_RUNS": str(runs)}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(arguments: list[str], runs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FSAM_RUNS": str(runs)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )


def long_arguments(cifar_root: Path) -> list[str]:
    """The tiny run (conftest's tiny_cli) stretched to 4 epochs of 8 steps (32 steps), so a signal lands mid-run."""
    return [
        "dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false", "dataset.num_workers=0",
        *TINY_MODEL_CLI, "trainer.epochs=4", "trainer.batch_size=8", "trainer.device=cpu", "trainer.amp=off",
    ]


@pytest.fixture
def long_cli(cifar_root):
    return long_arguments(cifar_root)


@pytest.fixture(scope="module")
def reference_dir(cifar_root, tmp_path_factory) -> Path:
    """The uninterrupted run every stopped run must reproduce (checkpoint settings do not change results)."""
    runs = tmp_path_factory.mktemp("reference")
    result = finish(long_arguments(cifar_root), runs)
    assert result.returncode == 0, result.stderr
    return the_run_folder(runs)


def test_a_run_killed_with_sigkill_at_a_random_step_resumes_to_the_same_weights_and_metrics(
    long_cli, reference_dir, tmp_path
):
    arguments = [*long_cli, "trainer.checkpoint_every_steps=1"]

    kill_after = random.Random().randrange(3, 26)  # a different step on every test run; printed on failure
    runs = tmp_path / "killed"
    process = launch(arguments, runs)
    deadline = time.monotonic() + 120
    run_dir = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(runs.rglob("checkpoints"))
        if found and saved_step(found[0].parent) >= kill_after:
            run_dir = found[0].parent
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {kill_after}: nothing was killed"
    assert run_dir is not None and not (run_dir / "summary.json").exists()
    killed_at = saved_step(run_dir)

    resumed = finish(arguments, runs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout, f"killed after step {kill_after} (checkpoint at {killed_at})"
    assert metrics_of(run_dir) == metrics_of(reference_dir), f"killed after step {kill_after}"
    straight, again = final_weights(reference_dir), final_weights(run_dir)
    assert all(torch.equal(straight[name], again[name]) for name in straight), f"killed after step {kill_after}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])  # SIGINT: Ctrl-C
def test_a_stop_signal_checkpoints_mid_epoch_and_exits_with_128_plus_the_signal(
    signum, long_cli, reference_dir, tmp_path
):
    runs = tmp_path / "stopped"
    process = launch(long_cli, runs)
    first_line = process.stdout.readline()  # "training ...": the model is built, steps are starting
    assert first_line.startswith("training"), first_line
    time.sleep(0.3)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"stopped: stopped by {name} in epoch" in err and "run the same command again to continue" in err
    assert "Traceback" not in err
    run_dir = the_run_folder(runs)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["global_step"] < 32 and not (run_dir / "summary.json").exists()
    assert f"after step {state['global_step']}:" in err

    resumed = finish(long_cli, runs)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_of(run_dir) == metrics_of(reference_dir)
    straight, again = final_weights(reference_dir), final_weights(run_dir)
    assert all(torch.equal(straight[name], again[name]) for name in straight)


def test_a_handler_installed_before_the_run_gets_the_signal_after_the_checkpoint(tiny_config, monkeypatch):
    """submitit's requeue handler: the run checkpoints, hands it the signal, and (when it returns) goes on."""
    calls = []
    saved_steps = []

    def requeue_handler(signum, frame):
        calls.append((signum, saved_step(Path(config["run_dir"]))))

    real_step, real_save = loop.train_step, loop._Trainer._save
    steps = []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    def counting_save(self, *args, **kwargs):
        saved_steps.append(self.progress.global_step)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    monkeypatch.setattr(loop._Trainer, "_save", counting_save)
    previous = signal.signal(signal.SIGUSR2, requeue_handler)
    try:
        config = tiny_config()
        summary = run(config)
        restored = signal.getsignal(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [(signal.SIGUSR2, 3)]  # after the checkpoint of step 3 was on disk
    assert saved_steps == [3, 4, 8]  # the signal's checkpoint, then the two epoch ends
    assert summary["status"] == "finished" and summary["global_steps"] == 8
    assert restored is requeue_handler  # the run gives the signal back when it ends


def test_relaunching_a_sweep_skips_finished_jobs_and_continues_unfinished_ones(train_py, tiny_cli, isolated_records):
    sweep = ["-m", "optimizer=sgd,fsam", *tiny_cli, "trainer.epochs=2"]
    first = train_py(*sweep)
    assert first.returncode == 0, first.stderr
    summaries = {path.parent: json.loads(path.read_text()) for path in isolated_records.rglob("summary.json")}
    assert sorted(summary["method"] for summary in summaries.values()) == ["fsam", "sgd"]
    sgd_dir = next(folder for folder, summary in summaries.items() if summary["method"] == "sgd")
    fsam_dir = next(folder for folder, summary in summaries.items() if summary["method"] == "fsam")
    straight = metrics_of(fsam_dir)
    # fsam's job was "killed" after epoch 1: its newest checkpoint is the one of epoch 1 and it has no summary
    (fsam_dir / "summary.json").unlink()
    (fsam_dir / "checkpoints" / "last.prev.pt").replace(fsam_dir / "checkpoints" / "last.pt")

    again = train_py(*sweep)
    assert again.returncode == 0, again.stderr
    assert f"skipped: {sgd_dir} is finished" in again.stdout
    assert "resuming fsam" in again.stdout and "epoch 2/2" in again.stdout and "epoch 1/2" not in again.stdout
    assert metrics_of(fsam_dir) == straight
    assert json.loads((fsam_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"optimizer": {"name": "sam"}}, "optimizer.name: fsam -> sam"),
        ({"model": {"name": "resnet18", "kwargs": {}}}, "model.name: pyramidnet110 -> resnet18"),
        ({"optimizer": {"base": "adamw"}}, "optimizer.base: sgd -> adamw"),
    ],
)
def test_a_checkpoint_of_another_model_or_optimizer_is_refused_by_name(tiny_config, change, named):
    config = tiny_config(trainer={"epochs": 2, "checkpoint_every_steps": 2})
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()  # unfinished: the next launch would resume it
    before = (Path(config["run_dir"]) / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=named) as error:
        run(tiny_config(trainer={"epochs": 2, "checkpoint_every_steps": 2}, **change))
    assert "leave run_dir out (each setting gets its own folder)" in str(error.value)
    assert (Path(config["run_dir"]) / "checkpoints" / "last.pt").read_bytes() == before  # nothing overwritten


def torchrun(arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "train.py"), *arguments]


def test_under_torchrun_sigterm_stops_both_processes_at_one_step_and_the_run_resumes_exactly(long_cli, tmp_path):
    """torchrun hands SIGTERM to both workers; they agree on the step (log_every), save one checkpoint together,
    and the relaunched run ends like the run that was never stopped."""
    arguments = [*long_cli, "trainer.batch_size=4", "trainer.log_every=1"]  # 2 x 4 per step: 8 steps an epoch
    env = {**os.environ, "FSAM_RUNS": str(tmp_path / "reference")}
    reference = subprocess.run(torchrun(arguments), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    env["FSAM_RUNS"] = str(tmp_path / "stopped")
    process = subprocess.Popen(
        torchrun(arguments), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    while line and not line.startswith("training"):
        line = process.stdout.readline()
    assert line.startswith("training"), process.communicate(timeout=60)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "stopped by SIGTERM in epoch" in err, err
    run_dir = the_run_folder(tmp_path / "stopped")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["global_step"] < 32 and not (run_dir / "summary.json").exists()
    assert f"after step {state['global_step']}:" in err  # the step rank 0 saved is the step both stopped at

    resumed = subprocess.run(torchrun(arguments), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference_dir = the_run_folder(tmp_path / "reference")
    assert metrics_of(run_dir) == metrics_of(reference_dir)
    straight, again = final_weights(reference_dir), final_weights(run_dir)
    assert all(torch.equal(straight[name], again[name]) for name in straight)
