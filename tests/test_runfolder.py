"""A run is what it computes: its identity, one writer per folder, and resumes that never mix settings.

The identity tests build configs in memory; the writer and resume tests train the tiny model for real, in this
process or as real ``python train.py`` processes that are started twice at once, killed with SIGKILL, or have
their folder deleted under them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from fsam.config import RunConfig, load_config
from fsam.engine import run
from fsam.errors import CheckpointError
from fsam.models.factory import CIFAR_MODELS, TIMM_ALIASES
from fsam.names import MODEL_DEFAULTS
from fsam.runfolder import (
    FREE_KEYS, RunFolder, RunFolderError, RunLock, default_run_dir, digest, setting, setting_name, write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]

# A value other than the schema's default for every key of a run's config; each is valid together with the
# other defaults. A key added to the schema must be added here, and so be decided: part of the setting or free.
OTHER_VALUE = {
    "run_dir": "elsewhere",
    "experiment_name": "another",
    "model.name": "resnet34",
    "model.pretrained": True,
    "model.pretrained_path": "/weights/resnet.pth",
    "model.kwargs": {"zero_init_residual": True},
    "dataset.name": "cifar10",
    "dataset.root": "/mnt/data",
    "dataset.download": False,
    "dataset.url": "http://mirror.example/cifar.tar.gz",
    "dataset.md5": "0" * 32,
    "dataset.image_size": 64,
    "dataset.num_workers": 8,
    "dataset.train_subset": 1000,
    "dataset.val_split": 5000,
    "dataset.val_seed": 4,  # with a validation split (below)
    "dataset.drop_last": False,
    "dataset.noise.kind": "symmetric",
    "dataset.noise.ratio": 0.2,  # with kind symmetric (below)
    "dataset.noise.seed": 3,  # with kind symmetric (below)
    "dataset.augment.crop": False,
    "dataset.augment.padding": 2,
    "dataset.augment.flip": False,
    "dataset.augment.cutout": False,
    "dataset.augment.cutout_size": 8,
    "dataset.augment.cutout_prob": 1.0,
    "dataset.augment.normalize": False,
    "optimizer.name": "sam",
    "optimizer.base": "adamw",
    "optimizer.lr": 0.1,
    "optimizer.momentum": 0.5,
    "optimizer.nesterov": True,
    "optimizer.weight_decay": 5e-4,
    "optimizer.betas": [0.8, 0.99],  # with base adamw (below)
    "optimizer.rho": 0.05,
    "optimizer.sigma": 0.5,
    "optimizer.lmbda": 0.9,
    "optimizer.eta": 0.01,  # with name fasam (below)
    "optimizer.ema_order": "paper",  # with sigma 0.5 (below)
    "optimizer.no_decay_norm_and_bias": True,
    "optimizer.perturbation": "noise",  # with name sam (below)
    "optimizer.full_grad_every": 100,  # with name sam and perturbation full (below)
    "schedule.name": "multistep",
    "schedule.warmup_epochs": 5.0,
    "schedule.warmup_lr": 0.01,  # with warmup_epochs 5 (below)
    "schedule.milestones": [60, 120],  # with name multistep (below)
    "schedule.gamma": 0.2,  # with name multistep (below)
    "logger.backend": "wandb",
    "logger.project": "elsewhere",
    "logger.entity": "lab",
    "logger.group": "g",
    "logger.tags": ["t"],
    "logger.name": "n",
    "logger.mode": "offline",
    "trainer.epochs": 100,
    "trainer.batch_size": 256,
    "trainer.eval_batch_size": 512,
    "trainer.micro_batches": 2,
    "trainer.device": "cpu",
    "trainer.amp": "off",
    "trainer.channels_last": True,
    "trainer.compile": True,
    "trainer.seed": 2,
    "trainer.log_every": 10,
    "trainer.checkpoint_every_steps": 500,
    "trainer.label_smoothing": 0.1,
    "trainer.sync_clean_pass": True,  # with 2 processes (below)
    "trainer.full_grad_analysis_every": 5,
}
# What a key needs beside it to be read at all (a key nobody reads is rightly not part of the setting).
CONTEXT = {
    "dataset.noise.ratio": {"dataset.noise.kind": "symmetric"},
    "dataset.noise.seed": {"dataset.noise.kind": "symmetric", "dataset.noise.ratio": 0.2},
    "dataset.val_seed": {"dataset.val_split": 5000},
    "optimizer.betas": {"optimizer.base": "adamw"},
    "optimizer.eta": {"optimizer.name": "fasam"},
    "optimizer.ema_order": {"optimizer.sigma": 0.5},
    "optimizer.perturbation": {"optimizer.name": "sam"},
    "optimizer.full_grad_every": {"optimizer.name": "sam", "optimizer.perturbation": "full"},
    "schedule.warmup_lr": {"schedule.warmup_epochs": 5.0},
    "schedule.milestones": {"schedule.name": "multistep"},
    "schedule.gamma": {"schedule.name": "multistep"},
}


def leaf_keys(node: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(node)
    for field in dataclasses.fields(node):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            keys += leaf_keys(kind, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def nested(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def identity(flat: dict[str, object], processes: int = 1) -> tuple[str, int]:
    config = nested(flat)
    return digest(setting(config, processes)), load_config({"run_dir": "x", **config}).trainer.seed


# -------------------------------------------------------------------------------------------------- identity


def test_every_config_key_is_decided_part_of_the_setting_or_free():
    assert sorted(OTHER_VALUE) == sorted(leaf_keys()), "give each new schema key a value in OTHER_VALUE"


@pytest.mark.parametrize("key", sorted(OTHER_VALUE))
def test_a_key_changes_the_identity_exactly_when_it_changes_what_is_computed(key):
    """The one list of free keys (FREE_KEYS) decides; the seed is a run of its own within the setting."""
    processes = 2 if key == "trainer.sync_clean_pass" else 1
    context = CONTEXT.get(key, {})
    before = identity(context, processes)
    after = identity({**context, key: OTHER_VALUE[key]}, processes)
    free = any(key == free or key.startswith(free + ".") for free in FREE_KEYS)
    if key == "trainer.seed":
        assert after[0] == before[0] and after[1] != before[1]
    elif free:
        assert after == before, f"{key} is free: it must not change the identity"
    else:
        assert after[0] != before[0], f"{key} changes what is computed: it must change the identity"


def test_keys_a_method_never_reads_do_not_split_its_runs():
    sgd = identity({"optimizer.name": "sgd"})
    assert identity({"optimizer.name": "sgd", "optimizer.rho": 0.5, "optimizer.sigma": 2.0}) == sgd
    assert identity({"optimizer.name": "sam", "optimizer.rho": 0.5}) != identity({"optimizer.name": "sam"})
    assert identity({"optimizer.name": "sam", "optimizer.lmbda": 0.9}) == identity({"optimizer.name": "sam"})
    assert identity({"optimizer.base": "sgd", "optimizer.betas": [0.5, 0.5]}) == identity({})
    assert identity({"optimizer.ema_order": "paper"}) == identity({})  # sigma 1: same direction
    assert identity({"dataset.noise.ratio": 0.4}) == identity({})  # no noise kind: the ratio is unused
    assert identity({"trainer.sync_clean_pass": True}) == identity({})  # one process: DDP only


def test_the_number_of_processes_is_part_of_the_setting_since_the_batch_size_is_per_process():
    assert identity({}, processes=2)[0] != identity({}, processes=1)[0]


def test_a_builder_option_gaining_a_default_keeps_every_existing_digest(monkeypatch):
    import fsam.runfolder as runfolder

    before = identity({"model.name": "pyramidnet110", "model.kwargs": {"depth": 8}})
    defaults = {**MODEL_DEFAULTS, "pyramidnet110": {**MODEL_DEFAULTS["pyramidnet110"], "new_option": "x"}}
    monkeypatch.setattr(runfolder, "MODEL_DEFAULTS", defaults)
    assert identity({"model.name": "pyramidnet110", "model.kwargs": {"depth": 8}}) == before
    assert identity({"model.name": "pyramidnet110", "model.kwargs": {"depth": 8, "new_option": "y"}}) != before


def test_a_model_kwarg_at_its_default_is_the_same_network():
    small = {"model.name": "pyramidnet110", "model.kwargs": {"depth": 8, "alpha": 16, "bottleneck": False}}
    assert identity({"model.name": "pyramidnet110"}) == identity(
        {"model.name": "pyramidnet110", "model.kwargs": {"depth": 110, "alpha": 270, "bottleneck": True}}
    )
    assert identity(small) != identity({"model.name": "pyramidnet110"})
    name = setting_name(setting(nested(small)))
    assert name.startswith("cifar100-pyramidnet8-fsam-"), "a small PyramidNet is not named PyramidNet-110"


def test_the_model_defaults_are_the_builders_own(
):
    for name, builder in CIFAR_MODELS.items():
        parameters = inspect.signature(builder).parameters
        own = {key: p.default for key, p in parameters.items() if key not in ("num_classes", "image_size")}  # from the data
        assert MODEL_DEFAULTS.get(name, {}) == own, name
    for name, alias in TIMM_ALIASES.items():
        assert MODEL_DEFAULTS.get(name, {}) == alias.defaults, name


def test_a_model_kwarg_of_the_wrong_kind_is_refused_before_anything_is_built():
    from fsam.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.kwargs.depth='abc' is not allowed: pyramidnet110 takes a whole"):
        setting(nested({"model.name": "pyramidnet110", "model.kwargs": {"depth": "abc"}}))


def test_the_folder_name_is_readable_and_unique_by_its_digest(isolated_records):
    folder = default_run_dir({"optimizer": {"name": "sam", "lr": 0.1}, "trainer": {"seed": 4}})
    assert folder.parent.parent == isolated_records and folder.name == "seed4"
    readable, short = folder.parent.name.rsplit("-", 1)
    assert readable == "cifar100-resnet18-sam" and len(short) == 12
    noisy = default_run_dir({"dataset": {"name": "cifar10", "noise": {"kind": "symmetric", "ratio": 0.4}},
                             "model": {"name": "timm:convnext_tiny"}})
    assert noisy.parent.name.startswith("cifar10-symmetric40-timm_convnext_tiny-fsam-")


def test_the_library_without_run_dir_trains_where_train_py_would(tiny_config, isolated_records):
    config = tiny_config(trainer={"epochs": 1})
    del config["run_dir"]
    summary = run(config)
    assert Path(summary["run_dir"]) == default_run_dir(config)
    assert Path(summary["run_dir"]).parent.name == summary["setting"]


# ----------------------------------------------------------------------------------------------- resume


def unfinished_run(tiny_config, **changes) -> dict:
    """A run with both epochs checkpointed but no summary, as if killed just before writing it."""
    config = tiny_config(**changes)
    run(config)
    (Path(config["run_dir"]) / "summary.json").unlink()
    return config


FREE_CHANGES = {
    "trainer.log_every": 3, "trainer.checkpoint_every_steps": 1, "trainer.eval_batch_size": 5,
    "trainer.device": "auto", "trainer.channels_last": True, "dataset.num_workers": 1, "experiment_name": "renamed",
    "logger.project": "elsewhere",
}


def test_a_relaunch_may_change_the_free_keys_and_continues_the_run(tiny_config):
    config = unfinished_run(tiny_config)
    changed = tiny_config(**nested(FREE_CHANGES))
    summary = run(changed)
    assert summary["status"] == "finished" and summary["global_steps"] == 8
    recorded, _ = RunFolder(config["run_dir"]).read_config()
    assert recorded["trainer"]["log_every"] == 3  # config.yaml records the launch that finished the run


@pytest.mark.parametrize(
    "change, listed",
    [
        ({"optimizer": {"lr": 0.1}}, "optimizer.lr: 0.05 -> 0.1"),
        ({"optimizer": {"rho": 0.3}}, "optimizer.rho: 0.2 -> 0.3"),
        ({"optimizer": {"weight_decay": 0.0}}, "optimizer.weight_decay: 0.001 -> 0.0"),
        ({"trainer": {"epochs": 3}}, "trainer.epochs: 2 -> 3"),
        ({"trainer": {"epochs": 1}}, "trainer.epochs: 2 -> 1"),
        ({"trainer": {"batch_size": 8}}, "trainer.batch_size: 16 -> 8"),
        ({"trainer": {"seed": 2}}, "seed: 1 -> 2"),
        ({"optimizer": {"name": "sam"}}, "optimizer.name: fsam -> sam"),
        ({"model": {"name": "resnet18", "kwargs": {}}}, "model.name: pyramidnet110 -> resnet18"),
    ],
)
@pytest.mark.parametrize("recorded_in", ["config.yaml", "checkpoint"])
def test_a_relaunch_under_another_setting_is_refused_with_the_keys_old_to_new(tiny_config, change, listed, recorded_in):
    config = unfinished_run(tiny_config)
    folder = Path(config["run_dir"])
    if recorded_in == "checkpoint":
        (folder / "config.yaml").unlink()  # only the checkpoint tells
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != ".lock"}
    merged = tiny_config(**change)
    with pytest.raises(CheckpointError, match="holds a run of another setting") as refused:
        run(merged)
    assert listed in str(refused.value) and "\n" not in str(refused.value)
    after = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != ".lock"}
    assert after == before, "a refused relaunch must not touch the run"


def test_a_finished_run_given_as_run_dir_under_another_setting_is_refused(tiny_config):
    config = tiny_config()
    run(config)
    with pytest.raises(CheckpointError, match=r"optimizer.lr: 0.05 -> 0.2"):
        run(tiny_config(optimizer={"lr": 0.2}))


# ---------------------------------------------------------------------------------------------- one writer


def launch(arguments: list[str], runs: Path) -> subprocess.Popen:
    env = {**os.environ, "FSAM_RUNS": str(runs)}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def slow_arguments(cifar_root: Path) -> list[str]:
    """The tiny run stretched to 4 epochs of 8 steps with a checkpoint every step: a few seconds of training."""
    from conftest import TINY_MODEL_CLI

    return [
        "dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false", "dataset.num_workers=0",
        *TINY_MODEL_CLI, "trainer.epochs=4", "trainer.batch_size=8", "trainer.device=cpu", "trainer.amp=off",
        "trainer.checkpoint_every_steps=1",
    ]


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_launches_at_once_train_the_run_once_and_the_second_names_the_holder(cifar_root, tmp_path):
    runs = tmp_path / "runs"
    arguments = slow_arguments(cifar_root)
    first, second = launch(arguments, runs), launch(arguments, runs)
    results = [(process, *process.communicate(timeout=300)) for process in (first, second)]
    codes = sorted(process.returncode for process, _, _ in results)
    assert codes == [0, 2], [err for _, _, err in results]
    (_, _, refused_err), = [result for result in results if result[0].returncode == 2]
    (winner, _, _), = [result for result in results if result[0].returncode == 0]
    lines = [line for line in refused_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the run folder ") and "Traceback" not in refused_err
    assert f"is in use by pid {winner.pid} on " in lines[0] and " since 20" in lines[0]
    (summary_path,) = runs.rglob("summary.json")
    run_dir = summary_path.parent
    assert [row["epoch"] for row in rows_of(run_dir)] == [1, 2, 3, 4]
    assert len((run_dir / "launches.jsonl").read_text().splitlines()) == 1
    assert not [path for path in run_dir.rglob("*.tmp")]


def test_a_holder_killed_with_sigkill_never_blocks_the_relaunch(cifar_root, tmp_path):
    runs = tmp_path / "runs"
    arguments = slow_arguments(cifar_root)
    process = launch(arguments, runs)
    wait_for(lambda: list(runs.rglob("checkpoints/last.pt")))
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    (lock,) = runs.rglob(".lock")
    assert json.loads(lock.read_text())["pid"] == process.pid  # the dead holder's record is still there
    relaunched = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "FSAM_RUNS": str(runs)},
    )
    assert relaunched.returncode == 0, relaunched.stderr
    assert "resuming" in relaunched.stdout
    assert [row["epoch"] for row in rows_of(lock.parent)] == [1, 2, 3, 4]


def test_a_lock_is_exclusive_between_processes_and_freed_by_the_holders_death(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fsam.runfolder import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"is in use by pid {holder.pid} on"):
            RunLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(folder)
    lock.acquire()  # the kernel freed the dead holder's lock
    lock.release()


def test_a_folder_deleted_mid_run_is_not_recreated_and_never_looks_finished(cifar_root, tmp_path):
    runs = tmp_path / "runs"
    arguments = slow_arguments(cifar_root)
    process = launch(arguments, runs)
    wait_for(lambda: list(runs.rglob("checkpoints/last.pt")))
    (run_dir,) = {path.parent.parent for path in runs.rglob("checkpoints/last.pt")}
    shutil.rmtree(run_dir, ignore_errors=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert "was deleted or replaced while this run trained" in err and "Traceback" not in err
    assert not list(runs.rglob("summary.json"))
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    relaunched = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *arguments], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "FSAM_RUNS": str(runs)},
    )
    assert relaunched.returncode == 0, relaunched.stderr
    assert "training" in relaunched.stdout and "resuming" not in relaunched.stdout  # starts clean
    assert [row["epoch"] for row in rows_of(run_dir)] == [1, 2, 3, 4]


def test_a_folder_replaced_mid_run_by_another_launch_is_noticed_and_never_written(tmp_path, tiny_cli):
    """Renamed away and made anew, with a new .lock another launch holds: the folder exists at its path all along,
    and only its identity tells the holder it is not the one it locked."""
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "inject.py"), "folder_replaced", *tiny_cli,
         "trainer.checkpoint_every_steps=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "FSAM_RUNS": str(runs)},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    (old,) = runs.rglob("seed1.old")
    new = old.with_name("seed1")
    assert lines == [f"error: the run folder {new} was deleted or replaced while this run trained: nothing more is "
                     "written there; relaunch the same command to start the run over"], result.stderr
    assert sorted(path.name for path in new.iterdir()) == [".lock"]  # the other launch's folder is untouched
    # The replacement came after step 2, before its checkpoint: that checkpoint was the write that noticed.
    assert torch.load(old / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 1
    assert not list(runs.rglob("summary.json"))


def test_a_summary_is_never_written_over_missing_records(tiny_config, monkeypatch):
    import fsam.runfolder as runfolder

    config = tiny_config(trainer={"epochs": 2})
    real_append = runfolder.RunFolder.append_metrics
    monkeypatch.setattr(runfolder.RunFolder, "append_metrics",
                        lambda self, row: real_append(self, row) if row["epoch"] == 1 else None)
    with pytest.raises(RunFolderError, match=r"holds epochs \[1\] where 2 were trained"):
        run(config)
    assert not (Path(config["run_dir"]) / "summary.json").exists()


def test_a_record_write_that_fails_reports_its_own_error_even_where_its_temporary_cannot_be_deleted(tmp_path,
                                                                                                      monkeypatch):
    """ext4 with errors=remount-ro: the write fails (disk full), and the file system, now read-only, refuses to
    delete the temporary file as well; the error to report is the write's."""
    import errno

    target = tmp_path / "summary.json"
    target.write_text("the old record\n")

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "fsync", disk_full)
    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(OSError) as error:
        write_json_atomic(target, {"status": "finished"})
    assert error.value.errno == errno.ENOSPC
    assert target.read_text() == "the old record\n"


# ------------------------------------------------------------------------------------ through train.py


def test_a_changed_value_in_a_config_file_is_a_new_run_and_never_resumes_the_old_one(cifar_root, tmp_path, tiny_cli):
    configs = tmp_path / "my_configs" / "optimizer"
    configs.mkdir(parents=True)
    option = configs / "mine.yaml"
    option.write_text((REPO / "configs" / "optimizer" / "_common.yaml").read_text() + "name: fsam\n")
    runs = tmp_path / "runs"
    env = {**os.environ, "FSAM_RUNS": str(runs)}

    def train(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "train.py"), "-cd", str(tmp_path / "my_configs"), "optimizer=mine",
                   *tiny_cli, "trainer.epochs=2", *extra]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    assert train().returncode == 0
    (first,) = [path.parent for path in runs.rglob("summary.json")]
    (first / "summary.json").unlink()  # unfinished: a relaunch of the same setting would continue it
    option.write_text(option.read_text().replace("lr: 0.05", "lr: 0.1"))
    changed = train()
    assert changed.returncode == 0, changed.stderr
    assert "training" in changed.stdout and "resuming" not in changed.stdout
    folders = {path.parent for path in runs.rglob("summary.json")}
    assert len(folders) == 1 and first not in folders  # the old run keeps its folder, untouched
    forced = train(f"run_dir={first}")
    assert forced.returncode == 2
    assert "optimizer.lr: 0.05 -> 0.1" in forced.stderr and len(forced.stderr.strip().splitlines()) == 1


def test_a_single_run_and_the_same_setting_as_a_sweep_job_share_one_folder(train_py, tiny_cli, isolated_records):
    single = train_py(*tiny_cli, "optimizer.lr=0.05")
    assert single.returncode == 0, single.stderr
    (folder,) = [path.parent for path in isolated_records.rglob("summary.json")]
    sweep = train_py("-m", *tiny_cli, "optimizer.lr=5e-2,0.1")
    assert sweep.returncode == 0, sweep.stderr
    assert f"skipped: {folder} is finished" in sweep.stdout
    assert len(list(isolated_records.rglob("summary.json"))) == 2


def test_hydra_shell_completion_is_left_to_hydra(train_py):
    result = train_py("-sc", "install=bash")
    assert result.returncode == 0, result.stderr
    assert "hydra_bash_completion" in result.stdout


def test_the_quickstart_folder_named_in_the_readme_is_the_one_it_trains_in(monkeypatch):
    """The digest is stable: changing what goes into it renames every folder, and must be a deliberate change
    (IDENTITY_VERSION, the README and the quick start's comment updated with it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.setenv("FSAM_RUNS", "runs")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart"])
    folder = str(default_run_dir(OmegaConf.to_container(cfg, resolve=True)))
    assert folder == "runs/digits-pyramidnet8-fsam-d9923828717e/seed1"
    assert folder in (REPO / "README.md").read_text()
    assert folder in (REPO / "configs" / "experiment" / "quickstart.yaml").read_text()


def test_a_float_range_sweep_value_is_the_number_a_person_types():
    swept = 0.05 + 0.05 + 0.05  # what Hydra's range(0.05, 0.3, 0.05) yields for the third value
    assert swept != 0.15
    assert identity({"optimizer.rho": swept}) == identity({"optimizer.rho": 0.15})
    assert identity({"optimizer.rho": 0.15}) != identity({"optimizer.rho": 0.1500001})


def test_the_readme_lists_exactly_the_free_keys():
    section = (REPO / "README.md").read_text().split("## Run folders", 1)[1].split("\n## ", 1)[0]
    listed = section.split("the one list):", 1)[1].split("Everything else", 1)[0]
    assert {name.removesuffix(".*") for name in re.findall(r"`([^`]+)`", listed)} == set(FREE_KEYS)


def test_an_option_added_after_the_identity_version_renames_no_existing_run():
    from fsam.runfolder import ADDED_KEYS

    for key, old in ADDED_KEYS.items():
        assert identity({key: old}) == identity({}), key  # the value every earlier run computed with
        assert key in OTHER_VALUE and OTHER_VALUE[key] != old


def test_a_launch_refused_while_the_holder_writes_who_it_is_still_names_the_holder(tmp_path):
    """The holder takes the lock before it writes its record: a second launch in between waits for the record
    instead of saying 'in use by pid ? on ?'."""
    import fcntl
    import threading

    from fsam.runfolder import RunHeldError

    descriptor = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    record = json.dumps({"pid": 4242, "host": "node7", "since": "2026-12-06T01:00:00"}).encode() + b"\n"
    writer = threading.Timer(0.3, lambda: os.pwrite(descriptor, record, 0))
    writer.start()
    try:
        with pytest.raises(RunHeldError, match="is in use by pid 4242 on node7 since 2026-12-06T01:00:00: "):
            RunLock(tmp_path).acquire()
    finally:
        writer.join()
        os.close(descriptor)


def test_the_holder_names_its_slurm_job_as_squeue_does(monkeypatch):
    from fsam.runfolder import slurm_job_id

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "118")
    assert slurm_job_id() == "118"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "117")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert slurm_job_id() == "117_1"  # task 1 of array 117 is job 118 to SLURM, 117_1 to squeue and scancel


def test_a_slurm_job_computes_with_its_cpus_per_task_unless_omp_num_threads_says_otherwise(monkeypatch):
    import torch

    from fsam.cluster import threads_from_slurm

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        assert threads_from_slurm() is None and torch.get_num_threads() == before  # not under SLURM
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        assert threads_from_slurm() == 3 and torch.get_num_threads() == 3
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads_from_slurm() is None and torch.get_num_threads() == before  # the user's setting wins
    finally:
        torch.set_num_threads(before)
