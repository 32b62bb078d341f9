"""scripts/reproduce.py: a named grid's commands (dry run) and the state of each of its runs (status)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import path_without_slurm
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


def test_a_list_value_is_one_value_and_a_range_is_swept_as_hydra_reads_them():
    expand = reproduce_module().expand
    assert expand(["optimizer.betas=[0.8,0.9]", "trainer.epochs=range(1,3)"]) == [
        ["optimizer.betas=[0.8,0.9]", "trainer.epochs=1"], ["optimizer.betas=[0.8,0.9]", "trainer.epochs=2"]
    ]


# (arguments, what the one line says); each is refused before anything is listed or launched.
BAD_ARGUMENTS = {
    "a value the schema refuses": (["--dry-run", "--", "optimizer.lr=-1"], "optimizer.lr=-1.0 is not allowed: must be > 0"),
    "an unknown key": (["--status", "--", "nosuchkey=1"], "nosuchkey is not a known key: the keys under the top level"),
    "a misspelt key": (["--dry-run", "--", "optimizer.lambda=0.5"], "optimizer.lambda is not a known key (did you mean "
                                                                    "lmbda?)"),
    "an unknown option": (["--dry-run", "--", "optimizer=adam"], "optimizer=adam is not an option of optimizer"),
    "no seeds": (["--dry-run", "--seeds", "0"], "--seeds 0 is not allowed: give how many seeds each setting trains"),
    "a flag after --": (["--dry-run", "--", "--epochs=2"], "'--epochs=2' is not an override whose runs can be listed"),
    "a sweep that cannot be listed": (["--status", "--", "optimizer.lr=interval(0.1,1)"],
                                      "'optimizer.lr=interval(0.1,1)' is not an override whose runs can be listed"),
    "a bad value when launching": (["--", "trainer.epochs=0"], "trainer.epochs=0 is not allowed: must be >= 1"),
    "SLURM off a cluster": (["--launcher", "slurm"], "hydra/launcher=slurm needs SLURM (srun and sbatch on PATH)"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_a_bad_argument_is_one_line_and_status_2_before_anything_is_listed_or_launched(case, tmp_path,
                                                                                      isolated_records):
    arguments, expected = BAD_ARGUMENTS[case]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce.py"), "--grid", "digits", *arguments], cwd=REPO,
        capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": path_without_slurm(tmp_path / "no-slurm")},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "running:" not in result.stdout and "would run:" not in result.stdout and "cells:" not in result.stdout
    assert not isolated_records.exists() or not any(isolated_records.iterdir())  # nothing was launched


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


def test_a_paper_grid_dry_run_lists_each_run_once_with_the_gpu_hours_line():
    dry = reproduce("--grid", "label_noise", "--seeds", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    runs = [line for line in dry.stdout.splitlines() if line.startswith("missing ")]
    assert len(runs) == 5 * 3 * 2 and len(set(runs)) == len(runs)  # noise levels x methods x seeds
    assert "cells: 30 missing\n" in dry.stdout
    assert len([line for line in dry.stdout.splitlines() if line.startswith("would run: ")]) == 5
    # results/benchmarks.md has CPU figures only: nothing may be estimated from them.
    assert "GPU-hours: not measured for 30 of 30 runs" in dry.stdout and "resnet18 (batch 128" in dry.stdout


def test_runs_that_two_grids_share_are_listed_once_in_all():
    status = reproduce("--grid", "all", "--seeds", "1", "--status")
    assert status.returncode == 0, status.stderr
    runs = [line.split()[1] for line in status.stdout.splitlines() if line.startswith("missing ")]
    assert len(runs) == len(set(runs)) == 115  # 118 cells; the ablations reuse 3 runs of the CIFAR-100 table
    assert "cells: 115 missing (3 more cells are runs listed above: the same setting)" in status.stdout
    assert "GPU-hours: " in status.stdout


GPU_SECTION = """
## 2027-01-02: NVIDIA H200, torch 2.14.1+cu130

- model resnet18 (100 classes), batch 128, precision off, channels_last False, compile False, 20 steps x 3 rounds
- FLOPs per image (FlopCounterMode, float32): forward 1.111 GFLOP, forward + backward 3.329 GFLOP

| method | ms / step | images / s | achieved TFLOP/s | memory |
|---|---|---|---|---|
| sgd | 12.8 | 10000 | 33.3 | peak allocated 900 MiB |
| sam | 25.6 | 5000 | 33.3 | peak allocated 950 MiB |
| fsam | 25.6 | 5000 | 33.3 | peak allocated 1000 MiB |
| baseline fsam | 40.0 | 3200 | 20.8 | peak allocated 1000 MiB |
"""


def test_gpu_hours_come_from_gpu_measurements_of_the_same_model_method_batch_and_precision(tmp_path):
    module = reproduce_module()
    record = tmp_path / "benchmarks.md"
    cpu_only = (REPO / "results" / "benchmarks.md").read_text()
    record.write_text(cpu_only)
    assert module.measured_throughput(record) == {}  # CPU sections say nothing about GPU-hours
    record.write_text(cpu_only + GPU_SECTION)
    measured = module.measured_throughput(record)
    assert measured[("resnet18", "sam", 128, "off", False, False)] == 5000.0
    assert not any(key[1] == "baseline fsam" for key in measured)
    configs = module.compose_cells([["experiment=paper_cifar100_resnet18_sgd"], ["experiment=paper_cifar100_resnet18_sam"],
                                    ["experiment=paper_cifar100_vgg16_bn_sam"]])
    # 200 epochs x 50,000 images at 10,000 and 5,000 images/s: 1000 s + 2000 s.
    line = module.gpu_hours(configs, measured)
    assert line.startswith("GPU-hours: 0.8 for 2 runs") and "not measured for 1 of 3 runs" in line
    assert "vgg16_bn_release (batch 128, precision off, 32 px)" in line
    bf16 = module.compose_cells([["experiment=paper_cifar100_resnet18_sam", "trainer.amp=bf16"]])
    assert module.gpu_hours(bf16, measured).startswith("GPU-hours: not measured for 1 of 1 runs")


def cells_of(module, grid: str) -> set[tuple[str, ...]]:
    return {tuple(cell) for block in module.blocks_of(grid) for cell in module.expand(block)}


def test_every_grid_holds_exactly_its_named_cells():
    """Each grid's cells by name, so a lost cell (the Figure-1 grid without its noise-only direction) fails here,
    not only a count."""
    module = reproduce_module()
    methods5, methods3 = ("sgd", "sam", "fsam", "asam", "fasam"), ("sgd", "sam", "fsam")
    expected = {
        "digits": {("experiment=quickstart", f"optimizer={method}") for method in methods3}
        | {("experiment=quickstart", f"optimizer={method}", "dataset.noise.kind=symmetric",
            f"dataset.noise.ratio={ratio}") for method in methods3 for ratio in ("0.2", "0.4")},
        "cifar100_resnet18": {("experiment=paper_cifar100_resnet18", f"optimizer={method}") for method in methods3},
        "figure1": {("experiment=paper_figure1_cifar100_resnet18", f"optimizer.perturbation={direction}")
                    for direction in ("minibatch", "full", "noise")},
        "figure1_digits": {("experiment=figure1_digits", f"optimizer.perturbation={direction}")
                           for direction in ("minibatch", "full", "noise")},
        "imagenet": {(f"experiment=paper_imagenet_resnet50_{method}",) for method in methods3},
        "vit": {(f"experiment={prefix}_{method}",) for prefix in ("paper_cifar10_deit_small",
                                                                   "paper_cifar100_deit_small", "cifar10_vit_scratch")
                for method in ("adamw", "sam", "fsam")},
        "label_noise": {(f"experiment=paper_cifar10_{noise}_resnet18_{method}",) for method in methods3
                        for noise in ("sym20", "sym40", "sym60", "sym80", "asym40")},
        "ablation_rho": {(f"experiment=paper_cifar100_resnet18_{method}", f"optimizer.rho={rho}")
                         for method in ("sam", "fsam") for rho in ("0.05", "0.1", "0.2", "0.3", "0.4", "0.5")},
        "ablation_lambda_sigma": {
            ("experiment=paper_cifar100_resnet18_fsam", f"optimizer.lmbda={lmbda}", f"optimizer.sigma={sigma}",
             f"optimizer.ema_order={order}")
            for lmbda in ("0", "0.3", "0.6", "0.9", "0.95", "0.99") for sigma in ("0.5", "1", "1.5", "2")
            for order in ("code", "paper") if order == "code" or (sigma != "1" and lmbda != "0")
        },
    }
    for dataset in ("cifar10", "cifar100"):
        expected[dataset] = {(f"experiment=paper_{dataset}_{model}_{method}",) for method in methods5
                             for model in ("resnet18", "wrn28_10", "pyramidnet110", "vgg16_bn")}
    expected["all"] = set().union(*(expected[name] for name in module.PAPER_GRIDS))
    study = module.STUDIES["digits_noise"]
    expected["digits_noise_tune"] = {
        ("experiment=digits_noise", *noise, f"optimizer={method}", *trial)
        for noise in (("dataset.noise.kind=none",), *((("dataset.noise.kind=symmetric", f"dataset.noise.ratio={r}"))
                                                       for r in ("0.2", "0.4", "0.6")),
                      ("dataset.noise.kind=asymmetric", "dataset.noise.ratio=0.4"))
        for method in ("sgd", "sam", "fsam") for trial in map(tuple, study.trial_overrides(method))}
    assert len(expected["digits_noise_tune"]) == 240
    expected["cifar10_noise_tune"] = {
        ("experiment=base/cifar10_resnet18", "dataset.val_split=5000", "trainer.full_grad_analysis_every=352",
         *cell[1:]) for cell in expected["digits_noise_tune"]}  # the same protocol at the paper's scale
    later = {f"{study}_{stage}" for study in ("digits_noise", "cifar10_noise") for stage in ("seeds", "heatmap", "sharpness")}
    assert set(module.GRIDS) == set(expected) | later  # the later stages read the tuning runs: tests/test_study.py
    for grid, cells in expected.items():
        assert cells_of(module, grid) == cells, grid


def test_status_and_dry_run_list_the_folders_the_overrides_after_the_double_dash_give(isolated_records):
    """The arguments after -- change the runs a grid launches, so they change the folders it reports."""
    plain = reproduce("--grid", "figure1_digits", "--seeds", "1", "--status")
    shorter = reproduce("--grid", "figure1_digits", "--seeds", "1", "--status", "--", "trainer.epochs=3")
    dry = reproduce("--grid", "figure1_digits", "--seeds", "1", "--dry-run", "--", "trainer.epochs=3")
    assert plain.returncode == shorter.returncode == dry.returncode == 0, shorter.stderr

    def listed(result: subprocess.CompletedProcess) -> set[str]:
        return {line.split()[1] for line in result.stdout.splitlines() if line.startswith("missing ")}

    assert len(listed(plain)) == len(listed(shorter)) == 3 and not listed(plain) & listed(shorter)
    assert listed(dry) == listed(shorter)
    module = reproduce_module()
    expected = {str(module.run_folder(["experiment=figure1_digits", f"optimizer.perturbation={direction}",
                                       "trainer.seed=1", "trainer.epochs=3"])) for direction in ("minibatch", "full", "noise")}
    assert listed(shorter) == expected
    assert all("trainer.epochs=3" in line for line in dry.stdout.splitlines() if line.startswith("would run: "))


def test_every_grid_is_listed_in_the_help_and_in_the_docs_table():
    module = reproduce_module()
    listed = reproduce("--help").stdout
    table = (REPO / "docs" / "reproducing.md").read_text()
    for name in module.GRIDS:
        assert f"\n  {name}: " in listed, name
        assert f"| `{name}` |" in table, name
