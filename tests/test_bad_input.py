"""Every bad input and fault of the README's troubleshooting table, through ``python train.py`` as a user runs it.

Each case runs a real process (faults that need a particular moment are injected by ``tests/inject.py``) and
checks the exit status, that the message is one line naming the problem and its fix, that no traceback is
printed, and that no run folder looks finished. The README's table lists the same cases, in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TINY_MODEL_CLI, path_without_slurm
import numpy as np

from datagen import md5_of, rewrite_cifar_batch, write_cifar_archive, write_imagefolder

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """``prepare(tmp_path, tiny_cli)`` gives the arguments (and may write files); ``expected`` must be in the
    message; ``status`` is the exit status; ``fault`` names a tests/inject.py fault; ``warning`` cases finish
    (status 0) and must print exactly one warning line containing ``expected``."""

    prepare: Callable[[Path, list[str]], list[str]]
    expected: str
    status: int = 2
    fault: str | None = None
    env: dict[str, str | None] = field(default_factory=dict)  # None: removed from the environment
    warning: bool = False
    check: Callable[[Path], None] | None = None


def args(*extra: str) -> Callable[[Path, list[str]], list[str]]:
    return lambda tmp_path, tiny_cli: [*tiny_cli, *extra]


def cifar_folder(build: Callable[[Path], list[str]]) -> Callable[[Path, list[str]], list[str]]:
    """Arguments of the tiny run reading CIFAR-10 from a folder that ``build(folder)`` prepares."""

    def prepare(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
        folder = tmp_path / "data"
        folder.mkdir()
        extra = build(folder)
        return [*tiny_cli, f"dataset.root={folder}", *extra]

    return prepare


def truncated_archive(folder: Path) -> list[str]:
    archive = write_cifar_archive(folder, n_train=400, extract=False)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return [f"dataset.md5={md5_of(archive)}"]  # the checksum of the truncated file: only extraction can tell


def wrong_checksum(folder: Path) -> list[str]:
    write_cifar_archive(folder, extract=False)  # the generated archive is not the official one
    return []


def other_variant(folder: Path) -> list[str]:
    write_cifar_archive(folder, "cifar100")
    return []


def imagenet(build: Callable[[Path], None]) -> Callable[[Path, list[str]], list[str]]:
    def prepare(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
        folder = tmp_path / "imagenet"
        build(folder)
        return [
            "dataset=imagenet", f"dataset.root={folder}", "dataset.image_size=32", "dataset.num_workers=0",
            *TINY_MODEL_CLI, "trainer.epochs=1", "trainer.batch_size=2", "trainer.device=cpu", "trainer.amp=off",
        ]

    return prepare


def planted(batch_name: str, **entries: object) -> Callable[[Path], list[str]]:
    """A CIFAR-10 folder whose ``batch_name`` holds ``entries`` that cannot be right."""

    def build(folder: Path) -> list[str]:
        write_cifar_archive(folder)
        rewrite_cifar_batch(folder, "cifar10", batch_name, **{
            key: value(folder) if callable(value) else value for key, value in entries.items()
        })
        return []

    return build


def float_pixels(folder: Path) -> np.ndarray:
    with open(folder / "cifar-10-batches-py" / "data_batch_1", "rb") as file:
        import pickle

        batch = pickle.load(file, encoding="bytes")
    return batch[b"data"].astype(np.float32) / 255.0


PLANTED_MARKER = "the planted code ran"  # beside the data folder and the runs folder


class PlantedCode:
    """Unpickles to a shell command that creates PLANTED_MARKER beside ``folder``, as a planted data file could."""

    def __init__(self, folder: Path) -> None:
        self.marker = folder.parent / PLANTED_MARKER

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def planted_code_never_ran(runs: Path) -> None:
    assert not (runs.parent / PLANTED_MARKER).exists()


def text_file_as_weights(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
    (tmp_path / "weights.pth").write_text("these are not weights\n")
    return [*tiny_cli, f"model.pretrained_path={tmp_path / 'weights.pth'}"]


def empty_imagefolder(folder: Path) -> None:
    for split in ("train", "val"):
        (folder / split / "class_0").mkdir(parents=True)


def unreadable_image(folder: Path) -> None:
    write_imagefolder(folder, classes=2, per_class=2)
    (folder / "train" / "class_1" / "image_0.JPEG").write_bytes(b"not a jpeg")


def unwritable_runs(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
    (tmp_path / "a-file").write_text("runs cannot go under a file")
    return tiny_cli


def interrupted_run(corrupt: bool) -> Callable[[Path, list[str]], list[str]]:
    """A run folder (run_dir given) holding an unfinished run's checkpoints, then damaged or reused."""

    def prepare(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
        run_dir = tmp_path / "run"
        first = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *tiny_cli, f"run_dir={run_dir}", "trainer.checkpoint_every_steps=2"],
            cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ),
        )
        assert first.returncode == 0, first.stderr
        (run_dir / "summary.json").unlink()
        if corrupt:
            for name in ("last.pt", "last.prev.pt"):
                path = run_dir / "checkpoints" / name
                path.write_bytes(path.read_bytes()[:100])
            return [*tiny_cli, f"run_dir={run_dir}"]
        return [*tiny_cli, f"run_dir={run_dir}", "optimizer=sam"]

    return prepare


def a_file_as(key: str) -> Callable[[Path, list[str]], list[str]]:
    """Arguments setting ``key`` to a path that is a file."""

    def prepare(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
        (tmp_path / "a-file").write_text("not a folder")
        return [*tiny_cli, f"{key}={tmp_path / 'a-file'}"]

    return prepare


def diverged_before(tmp_path: Path, tiny_cli: list[str]) -> list[str]:
    """A run that diverged in an earlier launch (status.json says so), relaunched as it was."""
    arguments = [*tiny_cli, "optimizer=sgd"]
    first = subprocess.run(
        [sys.executable, str(REPO / "tests" / "inject.py"), "nan_loss", *arguments],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert first.returncode == 2 and "training diverged" in first.stderr, first.stderr
    return arguments


def checkpoints_kept(runs: Path) -> None:
    """The fault hit a later write: the checkpoint before it is whole, and no temporary file is left."""
    (last,) = runs.rglob("checkpoints/last.pt")
    assert torch.load(last, weights_only=True)["global_step"] >= 1
    assert not [path for path in runs.rglob("*") if path.name.endswith(".tmp")]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def diverged(runs: Path) -> None:
    (status,) = runs.rglob("status.json")
    assert json.loads(status.read_text())["status"] == "diverged"


def fp16_skip_counted(runs: Path) -> None:
    (summary,) = runs.rglob("summary.json")
    record = json.loads(summary.read_text())
    assert record["skipped_steps"] == 1 and record["status"] == "finished"


CASES = {
    # --- config: checked before anything is built ------------------------------------------------------------
    "negative rho": Case(args("optimizer.rho=-0.1"), "optimizer.rho=-0.1 is not allowed: must be > 0"),
    "lmbda of 1": Case(args("optimizer.lmbda=1.0"), "optimizer.lmbda=1.0 is not allowed: must be in [0, 1)"),
    "negative sigma": Case(args("optimizer.sigma=-1"), "optimizer.sigma=-1.0 is not allowed: must be >= 0"),
    "zero learning rate": Case(args("optimizer.lr=0"), "optimizer.lr=0.0 is not allowed: must be > 0"),
    "zero batch": Case(args("trainer.batch_size=0"), "trainer.batch_size=0 is not allowed: must be >= 1"),
    "zero epochs": Case(args("trainer.epochs=0"), "trainer.epochs=0 is not allowed: must be >= 1"),
    "noise ratio above 1": Case(
        args("dataset.noise.kind=symmetric", "dataset.noise.ratio=1.5"),
        "dataset.noise.ratio=1.5 is not allowed: must be in [0, 1]",
    ),
    "unknown amp mode": Case(args("trainer.amp=fp32"), "trainer.amp='fp32' is not allowed: use one of bf16, fp16, off"),
    "misspelt key": Case(args("optimizer.lambda=0.5"), "optimizer.lambda is not a known key (did you mean lmbda?)"),
    "unknown model": Case(args("model=resnet19"), "model=resnet19 is not an option of model: choose one of"),
    "unknown dataset": Case(args("dataset=svhn"), "dataset=svhn is not an option of dataset: choose one of cifar10"),
    "unknown optimizer": Case(args("optimizer=adam"), "optimizer=adam is not an option of optimizer: choose one of asam"),
    "infinite learning rate": Case(args("optimizer.lr=inf"), "optimizer.lr=inf is not allowed: must be a finite number"),
    "model kwarg of the wrong kind": Case(
        args("model.kwargs.depth=abc"), "model.kwargs.depth='abc' is not allowed: pyramidnet110 takes a whole number"
    ),
    "model kwarg of the wrong kind in a sweep": Case(
        lambda tmp_path, tiny_cli: ["-m", *tiny_cli, "model.kwargs.depth=abc,8"],
        "model.kwargs.depth='abc' is not allowed",
    ),
    "validation split too large": Case(
        args("dataset.val_split=64"), "dataset.val_split=64 leaves no training examples (there are 64): hold out fewer"
    ),
    "last batch of one example": Case(
        args("dataset.drop_last=false", "trainer.batch_size=21"),
        "dataset.drop_last=false leaves a last batch of 1 example (64 per process, batch 21)",
    ),
    "search without a validation split": Case(
        lambda tmp_path, tiny_cli: ["-m", "experiment=tune_digits", "hydra.sweeper.n_trials=1", "dataset.val_split=0"],
        "hydra/sweeper=optuna maximises validation top-1, and this run has no validation split: add dataset.val_split=N",
    ),
    "run_dir is a file": Case(a_file_as("run_dir"), "is a file, not a folder"),
    "run_dir is empty": Case(args("run_dir="), "run_dir='' is not allowed: must not be empty"),
    # --- data ------------------------------------------------------------------------------------------------
    "missing data folder": Case(
        cifar_folder(lambda folder: []), "dataset.download=false"
    ),
    "truncated archive": Case(cifar_folder(truncated_archive), "truncated or corrupt"),
    "checksum mismatch": Case(cifar_folder(wrong_checksum), "does not match its md5 checksum"),
    "other CIFAR variant": Case(cifar_folder(other_variant), "holds CIFAR-100"),
    "empty ImageFolder": Case(imagenet(empty_imagefolder), "holds no images"),
    "unreadable image": Case(imagenet(unreadable_image), "image_0.JPEG"),
    "class count": Case(args("+model.kwargs.num_classes=100"), "model.kwargs.num_classes=100 does not fit dataset cifar10"),
    "float pixels in a CIFAR batch": Case(
        cifar_folder(planted("data_batch_1", data=float_pixels)), "holds float32 pixels in [0, 1]"
    ),
    "float labels in a CIFAR batch": Case(
        cifar_folder(planted("data_batch_1", labels=[2.7] * 16)), "holds the label 2.7 in 'labels'"
    ),
    "code planted in a CIFAR batch": Case(
        cifar_folder(planted("data_batch_1", data=PlantedCode)),
        "is not a readable CIFAR-10 batch (it names posix.system, which no CIFAR batch does",
        check=planted_code_never_ran,
    ),
    "empty test split": Case(
        cifar_folder(planted("test_batch", data=np.zeros((0, 3072), np.uint8), labels=[])), "holds no test images"
    ),
    "dataset.root is a file": Case(
        lambda tmp_path, tiny_cli: [*a_file_as("dataset.root")(tmp_path, tiny_cli), "dataset.download=true"],
        "is a file, not a folder",
    ),
    "pretrained_path is not a weights file": Case(text_file_as_weights, "cannot be loaded as weights"),
    "pretrained weights offline": Case(
        lambda tmp_path, tiny_cli: [*[a for a in tiny_cli if "model" not in a.split("=")[0]], "model=timm",
                                    "model.name=timm:resnet18", "model.pretrained=true"],
        "cannot get timm's pretrained weights for resnet18", env={"HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf"},
    ),
    "timm kwarg torch rejects": Case(
        args("model=timm", "model.name=timm:resnet18", "+model.kwargs.drop_rate=1.5"),
        "model.kwargs.drop_rate=1.5 is not a probability",
    ),
    # --- training --------------------------------------------------------------------------------------------
    "loss becomes NaN": Case(args("optimizer=sgd"), "training diverged", fault="nan_loss", check=diverged),
    "fp16 overflow": Case(
        args("optimizer=sgd", "trainer.amp=fp16"), "1 fp16 steps skipped", status=0, fault="inf_once",
        check=fp16_skip_counted,
    ),
    "out of memory": Case(args(), "use a smaller trainer.batch_size (e.g. 8)", fault="out_of_memory"),
    "relaunched diverged run": Case(diverged_before, "diverged in an earlier launch (training diverged"),
    # --- the run folder --------------------------------------------------------------------------------------
    "disk full during a checkpoint": Case(
        args("trainer.checkpoint_every_steps=1"), "(No space left on device): the checkpoints last.pt are kept",
        fault="disk_full", check=checkpoints_kept,
    ),
    "run folder turns read-only": Case(
        args("trainer.epochs=2"), "(Read-only file system): the checkpoints last.pt",
        fault="read_only", check=checkpoints_kept,
    ),
    # --- logging ---------------------------------------------------------------------------------------------
    "wandb not installed": Case(args("logger=wandb"), "wandb is not installed", status=0, fault="no_wandb", warning=True),
    "wandb not logged in": Case(
        args("logger=wandb", "logger.mode=online"), "wandb not logged in", status=0, warning=True,
        env={"WANDB_MODE": None, "WANDB_API_KEY": None},
    ),
    "wandb unreachable": Case(
        args("logger=wandb", "logger.mode=online"), "is unreachable: logging offline", status=0, warning=True,
        env={"WANDB_MODE": None, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"},
    ),
    "SLURM launcher off a cluster": Case(
        args("-m", "hydra/launcher=slurm"), "hydra/launcher=slurm needs SLURM (srun and sbatch on PATH)",
        env={"PATH": "{no_slurm}"},
    ),
    "unwritable runs folder": Case(unwritable_runs, "cannot be written", env={"FSAM_RUNS": "{tmp}/a-file/runs"}),
    # --- checkpoints -----------------------------------------------------------------------------------------
    "corrupt checkpoint": Case(interrupted_run(corrupt=True), "no readable checkpoint in"),
    "checkpoint of another optimizer": Case(
        interrupted_run(corrupt=False), "holds a run of another setting (optimizer.name: fsam -> sam; optimizer.rho: 0.2 -> 0.1; optimizer.lmbda"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_and_faults_give_one_clear_line_and_the_right_exit_status(name, tmp_path, tiny_cli, isolated_records):
    case = CASES[name]
    arguments = case.prepare(tmp_path, tiny_cli)
    env = dict(os.environ)
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            no_slurm = path_without_slurm(tmp_path / "no-slurm") if "{no_slurm}" in value else ""
            env[key] = value.format(tmp=tmp_path, no_slurm=no_slurm)
    env["HOME"] = str(tmp_path)  # no ~/.netrc login of the machine running the tests
    entry = [str(REPO / "tests" / "inject.py"), case.fault] if case.fault else [str(REPO / "train.py")]
    result = subprocess.run(
        [sys.executable, *entry, *arguments], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == case.status, output
    assert "Traceback" not in output
    if case.status == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and case.expected in lines[-1], result.stderr
        assert sum(line.startswith("error: ") for line in lines) == 1
        assert not list(isolated_records.rglob("summary.json")), "a failed run must not look finished"
    elif case.warning:
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
        assert len(warnings) == 1 and case.expected in warnings[0], result.stderr
    else:
        assert case.expected in output
    if case.check:
        case.check(isolated_records)


def can_mount(folder: Path) -> bool:
    """Whether this process may make ``folder`` a read-only bind mount in a mount namespace of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"],
        capture_output=True, timeout=60,
    )
    return probe.returncode == 0


def test_a_runs_folder_really_remounted_read_only_mid_run_gives_the_same_line(tmp_path, tiny_cli, isolated_records):
    """The ``read_only`` case above emulates a read-only file system; here it is one, so the emulation cannot
    drift from what the kernel refuses (it did: a real one also refuses to delete the unwritten temporary file)."""
    if not can_mount(tmp_path):
        pytest.skip("needs unshare --mount and the right to mount (root or CAP_SYS_ADMIN)")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(REPO / "tests" / "inject.py"),
         "read_only_mount", *tiny_cli, "trainer.epochs=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert lines[-1].startswith("error: cannot write ") and lines[-1].endswith(
        "(Read-only file system): the checkpoints last.pt are kept; make the file system writable, then relaunch "
        "the same command to continue"), result.stderr
    assert not list(isolated_records.rglob("summary.json"))
    checkpoints_kept(isolated_records)


def test_the_readme_troubleshooting_table_lists_every_case():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    for name in CASES:
        assert f"| {name} |" in section, f"README troubleshooting lacks the row '{name}'"
