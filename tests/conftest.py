"""Shared fixtures: a tiny CIFAR-10 archive in the official format, run folders in a temporary place, wandb offline."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker (pytest -n, one per core) and the subprocesses it starts compute with one thread: workers with
    # torch's default (all cores each) oversubscribe the machine and spin. One thread is also what makes a
    # subprocess's numbers equal to this process's to the bit, as the resume tests require.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after the thread setting, which torch reads when it loads

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from datagen import write_cifar_archive

REPO = Path(__file__).resolve().parents[1]

# The smallest network that exercises everything the engine touches (BatchNorm, residuals): PyramidNet with one
# basic block per stage, 16 -> 20 channels.
TINY_MODEL = {"name": "pyramidnet110", "kwargs": {"depth": 8, "alpha": 4, "bottleneck": False}}
# model.kwargs is an empty mapping in the model configs: Hydra adds keys to it with "+".
TINY_MODEL_CLI = ["model=pyramidnet110", "+model.kwargs.depth=8", "+model.kwargs.alpha=4", "+model.kwargs.bottleneck=false"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        reason = f"needs a CUDA GPU: this torch ({torch.__version__}) is a CPU-only build"
    else:
        reason = f"needs a CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none"
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def isolated_records(tmp_path, monkeypatch):
    """Run folders under this test's tmp_path; wandb never goes online."""
    monkeypatch.setenv("FSAM_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return tmp_path / "runs"


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-10 archive with 64 training and 32 test images (4 batches of 16), already extracted."""
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar_archive(root, "cifar10", n_train=64, n_test=32, seed=0)
    return root


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "kwargs":
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def tiny_config(tmp_path, cifar_root):
    """``tiny_config(**changes)``: a plain-dict config of a 2-epoch, 4-steps-per-epoch CPU run in tmp_path/run."""

    def make(**changes: Any) -> dict[str, Any]:
        base = {
            "run_dir": str(tmp_path / "run"),
            "dataset": {"name": "cifar10", "root": str(cifar_root), "download": False, "num_workers": 0},
            "model": TINY_MODEL,
            "optimizer": {"name": "fsam", "lr": 0.05},
            "trainer": {"epochs": 2, "batch_size": 16, "device": "cpu", "amp": "off", "log_every": 1},
        }
        return merge(base, changes)

    return make


@pytest.fixture
def tiny_cli(cifar_root):
    """Command-line overrides of a 1-epoch CPU run on the tiny archive."""
    return [
        "dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false", "dataset.num_workers=0",
        *TINY_MODEL_CLI, "trainer.epochs=1", "trainer.batch_size=16", "trainer.device=cpu", "trainer.amp=off",
    ]


@pytest.fixture
def train_py():
    """``train_py(*arguments)``: run ``python train.py ARGUMENTS`` in the repository as a real subprocess, with
    this test's environment (FSAM_RUNS, WANDB_MODE); returns the CompletedProcess."""

    def run(*arguments: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "train.py"), *arguments],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
        )

    return run


TIME_KEYS = {"images_per_s", "epoch_time_s", "wall_time_s"}


def metrics_of(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_times(rows: list[dict]) -> list[dict]:
    """Metrics rows without the timings, which differ between any two runs."""
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


def stop_at_call(monkeypatch, call: int, exception: BaseException) -> None:
    """Make the loop's train_step raise ``exception`` on its ``call``-th call (1-based), as a kill would."""
    import fsam.engine.loop as loop

    real = loop.train_step
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exception
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted)


SLURM_COMMANDS = {"srun", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "sacct", "salloc", "sstat"}


def path_without_slurm(folder: Path) -> str:
    """A PATH with every command of this one but SLURM's (links in ``folder``): "a machine without SLURM" on a
    machine that has it."""
    folder.mkdir(parents=True, exist_ok=True)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = folder / entry.name
            if entry.name in SLURM_COMMANDS or target.exists() or not os.access(entry.path, os.X_OK):
                continue
            target.symlink_to(entry.path)
    return str(folder)

