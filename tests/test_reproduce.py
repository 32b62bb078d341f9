"""scripts/reproduce.py: a named grid's commands (dry run) and the state of each of its runs (status)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from fsam.runfolder import RunLock

REPO = Path(__file__).resolve().parents[1]


def reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reproduce(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), *arguments], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_a_block_expands_to_every_combination_in_order():
    expand = reproduce_module().expand
    assert expand(["a=1", "b=x,y", "c=2,3"]) == [
        ["a=1", "b=x", "c=2"], ["a=1", "b=x", "c=3"], ["a=1", "b=y", "c=2"], ["a=1", "b=y", "c=3"]
    ]


def test_the_dry_run_lists_the_sweeps_and_the_status_counts_each_state(isolated_records):
    module = reproduce_module()
    finished = module.run_folder(["experiment=quickstart", "optimizer=sgd", "trainer.seed=1"])
    running = module.run_folder(["experiment=quickstart", "optimizer=fsam", "dataset.noise.kind=symmetric",
                                 "dataset.noise.ratio=0.4", "trainer.seed=2"])
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text('{"status": "finished"}\n')
    running.mkdir(parents=True)
    lock = RunLock(running)
    lock.acquire()
    try:
        status = reproduce("--grid", "digits", "--seeds", "2", "--status")
    finally:
        lock.release()
    assert status.returncode == 0, status.stderr
    assert "cells: 1 finished, 16 missing, 1 running" in status.stdout  # 3 methods x 3 noise levels x 2 seeds
    assert f"finished   {finished}" in status.stdout and f"running    {running}" in status.stdout
    dry = reproduce("--grid", "digits", "--seeds", "2", "--dry-run", "--", "trainer.epochs=2")
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if line.startswith("would run: ")]
    assert commands == [
        "would run: train.py -m hydra/launcher=inprocess experiment=quickstart optimizer=sgd,sam,fsam "
        "trainer.seed=1,2 trainer.epochs=2",
        "would run: train.py -m hydra/launcher=inprocess experiment=quickstart optimizer=sgd,sam,fsam "
        "dataset.noise.kind=symmetric dataset.noise.ratio=0.2,0.4 trainer.seed=1,2 trainer.epochs=2",
    ]
    assert not list(isolated_records.rglob("metrics.jsonl"))  # nothing was trained
