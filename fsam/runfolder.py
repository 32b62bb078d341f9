"""The run folder: what a run is (its identity), where it lives, who may write it, and its records.

The engine writes run folders through this module and the reports read them through it; it imports neither torch
nor Hydra, so a table script or a command-line check pays for neither.

**Identity.** A run's *setting* is its checked configuration without the keys that do not change what is
computed (:data:`FREE_KEYS`: where data and runs live, logging, device and speed options, checkpoint cadence) and
without the seed, plus the number of processes (the batch size is per process). Model keyword arguments equal to the
builder's defaults are left out, so ``+model.kwargs.depth=110`` and nothing name the same network. The
setting's digest names the folder, groups seeds in tables and names the wandb group::

    <runs>/<dataset>-<model>-<method>-<digest>/seed<seed>/
        .lock            held (flock) by the one process that trains the run; says who holds it
        config.yaml      identity: the setting, its digest, the model as built; then the checked config
        launches.jsonl   one line per launch that trained: host, pid, time, command, where it started from
        metrics.jsonl    one JSON object per finished epoch
        checkpoints/     last.pt, last.prev.pt, best.pt; final.pt once finished (fsam.engine.checkpoint)
        status.json      only when the run stopped for a reason a relaunch cannot fix (diverged)
        summary.json     written last: its presence means the run finished
        analysis/        sharpness.json, written after the run by scripts/sharpness.py (fsam.analysis.record)

Every whole-file write goes to a temporary file private to its writer, is flushed to disk and renamed over the
target, so a reader (or a killed run) sees the old content or the new one, never half of it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from fsam.config import RunConfig, load_config, to_plain
from fsam.errors import ConfigError, FsamError
from fsam.names import MODEL_DEFAULTS

# Bumped whenever what goes into the digest changes; old folders then keep their names and are told apart.
IDENTITY_VERSION = 1
DIGEST_LENGTH = 12  # hex digits in the folder name: 48 bits, no collision in any realistic number of settings
# The digest that ends a setting name, and an identity-named run folder: <setting name>/seed<N>.
NAMED_SETTING = re.compile(rf"-(?P<digest>[0-9a-f]{{{DIGEST_LENGTH}}})$")
NAMED_FOLDER = re.compile(rf"[^/]+-(?P<digest>[0-9a-f]{{{DIGEST_LENGTH}}})/seed(?P<seed>\d+)")

# Keys that do not change what a run computes: they are left out of its setting, and a relaunch may change them
# and still continue the run. Everything else (trainer.epochs included: the cosine schedule depends on it) is part
# of the setting. A key listed here covers the keys under it.
FREE_KEYS = (
    "run_dir",                         # where the records go
    "experiment_name",                 # a label; the same setting under two names is one run
    "dataset.root",                    # where the data lives and how it is fetched
    "dataset.download",
    "dataset.url",
    "dataset.md5",
    "dataset.num_workers",             # loader processes; the batches are the same for any number
    "logger",                          # wandb or nothing, its project, names and tags
    "trainer.device",                  # which accelerator (float results differ in the last bits, not in meaning)
    "trainer.channels_last",           # memory layout
    "trainer.compile",                 # torch.compile of the same model
    "trainer.eval_batch_size",         # evaluation in eval mode: the batch size does not change the model
    "trainer.log_every",               # progress-bar and wandb cadence (logging only reads the loss)
    "trainer.checkpoint_every_steps",  # checkpoint cadence
    "trainer.full_grad_analysis_every",  # measures F-SAM's EMA against the full gradient; changes no weight
)
SEED_KEY = "trainer.seed"  # not in the setting (seeds of one setting are averaged), but a run is one seed
# Keys added to the config after this identity version, and the value that computes what runs did before they
# existed: at that value they are left out of the setting, so adding an option never renames existing runs.
ADDED_KEYS = {
    "model.pretrained": False,
    "dataset.val_split": 0,
    "dataset.val_seed": 0,
    "dataset.drop_last": True,
    "optimizer.perturbation": "minibatch",
}

# The optimizer keys each method reads; the others are left out of its setting (SGD with another rho is the same run).
METHOD_KEYS = {
    "sgd": (),
    "sam": ("rho", "perturbation", "full_grad_every"),
    "asam": ("rho", "eta"),
    "fsam": ("rho", "sigma", "lmbda", "ema_order"),
    "fasam": ("rho", "sigma", "lmbda", "ema_order", "eta"),
}
SAM_FAMILY_KEYS = ("rho", "sigma", "lmbda", "eta", "ema_order", "perturbation", "full_grad_every")
BASE_KEYS = {"sgd": ("momentum", "nesterov"), "adamw": ("betas",)}

PACKAGES = ("torch", "torchvision", "timm", "numpy", "hydra-core", "omegaconf", "wandb", "fsam")


HOLDER_RECORD_TRIES = 40  # 2 s at most for a holder between taking the lock and writing who it is


class RunFolderError(FsamError):
    """The run folder cannot be used: held by another process, deleted mid-run, unwritable, another setting."""


class RunHeldError(RunFolderError):
    """Another process trains this run now (a second writer is refused, touching nothing)."""


# ------------------------------------------------------------------------------------------------- identity


def processes_from_environment() -> int:
    """The number of processes this launch trains with: torchrun's WORLD_SIZE, else SLURM's task count, else 1."""
    for variable in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(variable, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def model_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the builder's defaults and typed like them (``alpha=270`` and ``270.0`` are one
    value). ConfigError for a value of the wrong kind (``depth='abc'``), before anything is built. Names without
    known defaults (timm models) keep their kwargs as given."""
    defaults = MODEL_DEFAULTS.get(name, {})
    completed = dict(defaults)
    for key, value in kwargs.items():
        if key in defaults:
            value = _like(defaults[key], value, f"model.kwargs.{key}", name)
        completed[key] = value
    return completed


def non_default_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs that differ from the builder's defaults (typed like them): what a setting records of the model.
    A kwarg set to its default is the same network as one left out, and a builder that gains an option with a
    default keeps every existing setting's digest."""
    defaults = MODEL_DEFAULTS.get(name, {})
    return {key: value for key, value in model_kwargs(name, kwargs).items()
            if key not in defaults or value != defaults[key]}


def _like(default: Any, value: Any, key: str, model: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        allowed = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        allowed = "a whole number"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        allowed = "a number"
    else:
        return value
    raise ConfigError(f"{key}={value!r} is not allowed: {model} takes {allowed} (default {default!r})")


def setting(config: RunConfig | Mapping[str, Any], processes: int = 1) -> dict[str, Any]:
    """What the run computes: the checked config without :data:`FREE_KEYS` and the seed, model kwargs without the
    builder's defaults, plus ``processes``. Two launches with equal settings compute the same thing (up to the seed)."""
    plain = to_plain(load_config(_with_run_dir(config)))
    plain["model"]["kwargs"] = non_default_kwargs(plain["model"]["name"], plain["model"]["kwargs"])
    added_at_old_value = [key for key, old in ADDED_KEYS.items() if lookup(plain, key) == old]
    for key in (*FREE_KEYS, SEED_KEY, *unused_keys(plain, processes), *added_at_old_value):
        _drop(plain, key)
    plain["processes"] = int(processes)
    plain["identity_version"] = IDENTITY_VERSION
    return _rounded(plain)


def _rounded(value: Any) -> Any:
    """Numbers to 12 significant digits: a swept ``range(0.05, 0.3, 0.05)`` gives 0.15000000000000002, which is
    the 0.15 a person types (the difference, 2e-17, changes nothing a run computes)."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def unused_keys(plain: Mapping[str, Any], processes: int = 1) -> list[str]:
    """The keys of a checked config (as plain data) that its method, base optimizer, schedule, noise, augmentation
    and number of processes never read, so they cannot change what it computes."""
    optimizer, schedule, dataset = plain["optimizer"], plain["schedule"], plain["dataset"]
    unused = [f"optimizer.{key}" for key in SAM_FAMILY_KEYS if key not in METHOD_KEYS[optimizer["name"]]]
    unused += [f"optimizer.{key}" for base, keys in BASE_KEYS.items() if base != optimizer["base"] for key in keys]
    if optimizer["name"] in ("fsam", "fasam") and optimizer["sigma"] == 1.0 and optimizer["lmbda"] > 0:
        unused.append("optimizer.ema_order")  # at sigma = 1 the orders' directions differ by the factor lmbda only
    if optimizer["perturbation"] == "minibatch":
        unused.append("optimizer.full_grad_every")  # only the analysis directions use the full gradient
    if schedule["name"] != "multistep":
        unused += ["schedule.milestones", "schedule.gamma"]
    if schedule["warmup_epochs"] == 0:
        unused.append("schedule.warmup_lr")
    if dataset["noise"]["kind"] == "none":
        unused += ["dataset.noise.ratio", "dataset.noise.seed"]
    if not dataset.get("val_split"):
        unused.append("dataset.val_seed")
    if dataset["name"] == "imagenet":
        unused.append("dataset.augment")  # ImageNet takes timm's standard transforms, not these switches
    elif not dataset["augment"]["crop"]:
        unused.append("dataset.augment.padding")
    if dataset["name"] != "imagenet" and not dataset["augment"]["cutout"]:
        unused += ["dataset.augment.cutout_size", "dataset.augment.cutout_prob"]
    if processes == 1:
        unused.append("trainer.sync_clean_pass")  # DDP only
    return unused


def _with_run_dir(config: RunConfig | Mapping[str, Any]) -> RunConfig | Mapping[str, Any]:
    """A config that may lack run_dir (a Hydra composition before its folder is known) is checked as if set."""
    if isinstance(config, RunConfig) or config.get("run_dir"):
        return config
    return {**config, "run_dir": "(not yet known)"}


def lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` in nested mappings, or None where a level is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(last, None)


def digest(setting_record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the setting written as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(setting_record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def model_label(name: str, kwargs: Mapping[str, Any]) -> str:
    """A short name for the network as built: ``pyramidnet110`` with depth 8 is ``pyramidnet8``."""
    if name == "pyramidnet110" and kwargs.get("depth", 110) != 110:
        return f"pyramidnet{kwargs['depth']}"
    return name


def setting_name(setting_record: Mapping[str, Any]) -> str:
    """``<dataset>[-<noise><percent>]-<model>-<method>-<digest>``: readable, and unique by its digest."""
    dataset = setting_record["dataset"]
    parts = [dataset["name"]]
    if dataset["noise"]["kind"] != "none":
        parts.append(f"{dataset['noise']['kind']}{100 * dataset['noise']['ratio']:g}")
    model = setting_record["model"]
    parts += [model_label(model["name"], model["kwargs"]), setting_record["optimizer"]["name"]]
    if setting_record["optimizer"].get("perturbation", "minibatch") != "minibatch":
        parts[-1] += f"_{setting_record['optimizer']['perturbation']}"  # sam_full, sam_noise
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_")
    return f"{readable}-{digest(setting_record)[:DIGEST_LENGTH]}"


def seed_of(config: RunConfig | Mapping[str, Any]) -> int:
    return load_config(_with_run_dir(config)).trainer.seed


def runs_root() -> Path:
    """Where run folders go: ``$FSAM_RUNS``, else ``runs`` in the current folder."""
    return Path(os.environ.get("FSAM_RUNS") or "runs")


def default_run_dir(config: RunConfig | Mapping[str, Any], processes: int | None = None) -> Path:
    """``<runs>/<setting name>/seed<seed>``: the folder a config trains in unless it names its own run_dir."""
    processes = processes_from_environment() if processes is None else processes
    return runs_root() / setting_name(setting(config, processes)) / f"seed{seed_of(config)}"


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two nested records differ; keys that only one side uses (another
    method's hyperparameters) come last, shown as ``(not used)``."""
    both, one_side = [], []
    for key in sorted(set(old) | set(new), key=str):
        was, now = old.get(key, NOT_USED), new.get(key, NOT_USED)
        if isinstance(was, Mapping) and isinstance(now, Mapping):
            inner = differences(was, now, f"{prefix}{key}.")
            both += [line for line in inner if NOT_USED not in line]
            one_side += [line for line in inner if NOT_USED in line]
        elif was != now:
            line = f"{prefix}{key}: {_compact(was)} -> {_compact(now)}"
            (one_side if NOT_USED in (was, now) else both).append(line)
    return both + one_side


NOT_USED = "(not used)"


def _compact(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def run_key(config: RunConfig | Mapping[str, Any], processes: int) -> dict[str, Any]:
    """The setting plus the seed: what a checkpoint must share with the run that continues it."""
    return {**setting(config, processes), "seed": seed_of(config)}


# ---------------------------------------------------------------------------------------------- atomic files


def write_atomic(path: str | os.PathLike[str], text: str | bytes) -> None:
    """Replace ``path`` with ``text`` in one step: a private temporary file, flush, fsync, rename."""
    path = Path(path)
    data = text.encode() if isinstance(text, str) else text
    temporary = private_temporary(path)
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        remove_temporary(temporary)
        raise
    sync_folder(path.parent)


def private_temporary(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses (process id and a random part)."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def remove_temporary(path: Path) -> None:
    """Delete the temporary file of a write that failed. Where the deletion fails too (a read-only file system
    refuses to delete even a file that is not there) the file stays: its hidden, private name is never read as a
    record, and the error of the write is the one to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_json_atomic(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    # Serialised before anything touches the disk, so a record that cannot be written leaves no trace.
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True, allow_nan=True) + "\n")


def sync_folder(folder: Path) -> None:
    """Make a rename durable (the folder entry); not possible on every platform, harmless to skip there."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a metrics file (a line cut by a kill mid-write is skipped)."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def kept_checkpoints(folder: Path) -> str:
    """What a relaunch continues from after a failed write, for its message: the checkpoints in ``folder``."""
    kept = [name for name in ("last.pt", "last.prev.pt") if (folder / name).exists()]
    return f"the checkpoints {', '.join(kept)} are kept" if kept else "no checkpoint was written yet"


def write_error(path: Path, error: OSError, kept: str) -> RunFolderError:
    """The one-line error for a record that could not be written (disk full, read-only folder...)."""
    reason = error.strerror or str(error)
    fixes = {
        errno.ENOSPC: "free space on that disk",
        errno.EDQUOT: "free space within your quota",
        errno.EROFS: "make the file system writable",
        errno.EACCES: "make the folder writable",
        errno.EPERM: "make the folder writable",
    }
    fix = fixes.get(error.errno, "fix the folder")
    return RunFolderError(f"cannot write {path} ({reason}): {kept}; {fix}, then relaunch the same command to continue")


# --------------------------------------------------------------------------------------------------- the lock


def slurm_job_id() -> str | None:
    """This process's SLURM job as squeue and scancel name it: ``<array job>_<task>`` in a job array (each task's
    SLURM_JOB_ID is a number squeue does not show), else SLURM_JOB_ID; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class RunLock:
    """One writer per run folder: an exclusive ``flock`` on ``<run_dir>/.lock``.

    The kernel releases the lock when its holder dies in any way (SIGKILL, out of memory, a SLURM job killed
    before its requeue), so a dead holder never blocks a relaunch; on NFS the server frees a lost node's lock when
    its lease runs out (about 90 s with NFSv4). The file names the holder (host, pid, start time, SLURM job) for
    the refusal message, and is never deleted, so two processes can never lock two different files of one name.
    While held, :meth:`check` tells whether the folder is still the one that was locked: a folder deleted or
    replaced mid-run is noticed before the next write instead of being silently recreated.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._descriptor: int | None = None
        self._identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunFolderError naming the holder; touches nothing of the run either way."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise write_error(self.path, error, "nothing was started") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunHeldError(self._held_message()) from None
            raise RunFolderError(
                f"cannot lock {self.path} ({error.strerror}): this file system has no flock; put the runs on one "
                "that has (FSAM_RUNS=...), e.g. local disk or NFS/Lustre mounted with flock"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": now_iso(),
            "slurm_job": slurm_job_id(),
            "command": command_line(),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        status = os.fstat(descriptor)
        self._descriptor, self._identity = descriptor, (status.st_dev, status.st_ino)

    def _held_message(self) -> str:
        # The holder takes the lock, then writes who it is: a launch refused in between waits for the record.
        holder: dict[str, Any] = {}
        for _ in range(HOLDER_RECORD_TRIES):
            holder = read_json(self.path) or {}
            if "pid" in holder:
                break
            time.sleep(0.05)
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
        if holder.get("slurm_job"):
            who += f" (SLURM job {holder['slurm_job']})"
        return (
            f"the run folder {self.path.parent} is in use by {who}: wait for it to finish or stop it; if that "
            f"process is gone for good (a lost node), delete {self.path} and relaunch"
        )

    def held_by_another(self) -> bool:
        """Whether a process holds this lock now (a run in progress); asks without taking it for long."""
        try:
            descriptor = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        finally:
            os.close(descriptor)  # also drops the shared lock if it was taken
        return False

    def check(self) -> None:
        """RunFolderError when the locked folder was deleted or replaced since :meth:`acquire`."""
        if self._identity is None:
            return
        try:
            status = os.stat(self.path)
        except OSError:
            status = None
        if status is None or (status.st_dev, status.st_ino) != self._identity:
            raise RunFolderError(
                f"the run folder {self.path.parent} was deleted or replaced while this run trained: nothing more is "
                "written there; relaunch the same command to start the run over"
            )

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = self._identity = None


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])


# ------------------------------------------------------------------------------------------------ the folder


class RunFolder:
    """Paths, lock, writers and readers of one run folder."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir)
        self.config = self.path / "config.yaml"
        self.launches = self.path / "launches.jsonl"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.status = self.path / "status.json"
        self.checkpoints = self.path / "checkpoints"
        self.sharpness = self.path / "analysis" / "sharpness.json"
        self.lock = RunLock(self.path)

    # --- holding it

    def hold(self) -> None:
        """Create the folder if needed and take its lock (RunFolderError if another process holds it)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"run_dir={self.path} is a file, not a folder: give a folder (or leave run_dir out)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(self.path, error, "nothing was started") from None
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    # --- reading

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a finished run, or None while the run is unfinished."""
        return read_json(self.summary) if self.summary.exists() else None

    def state(self) -> str:
        """``finished``, ``diverged``, ``running`` (a process holds it now) or ``unfinished`` (stopped or killed)."""
        if self.summary.exists():
            return "finished"
        if self.stopped_status() is not None:
            return "diverged"
        return "running" if self.lock.held_by_another() else "unfinished"

    def stopped_status(self) -> dict[str, Any] | None:
        """The status record of a run that stopped for good (diverged), else None."""
        status = read_json(self.status)
        return status if status and status.get("status") == "diverged" else None

    def read_config(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(config, identity)`` from config.yaml, or ``(None, None)`` without a readable one.

        The identity's ``setting`` and ``digest`` are computed afresh from the config (with the recorded number of
        processes), so folders written before identities existed, or under an older identity version, group with
        new runs of the same setting; the rest (the model as built) is as recorded. ``identity`` is None when the
        config no longer passes the schema. Whether the config is still the one the run trained with is
        :meth:`problem`'s question.
        """
        record, _ = self._config_record()
        if record is None:
            return None, None
        recorded = record.pop("identity", None) or {}
        try:
            key = setting(record, processes=recorded.get("processes", 1))
        except FsamError:
            return record, None
        identity = {**recorded, "setting": setting_name(key), "digest": digest(key), "seed": seed_of(record),
                    "processes": key["processes"]}
        return record, identity

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    def problem(self) -> str | None:
        """Why this folder's records cannot be trusted, in a few words; None when they can.

        Every folder needs a config.yaml that parses and checks, and that config must compute the setting (digest)
        and seed the run trained: the ones its recorded identity, its folder name (``<setting name>/seed<N>``)
        and its summary carry. A config edited after the run fails this. A finished run also needs a summary.json
        and a metrics.jsonl that parse, the latter holding every epoch the config trains, 1 to N. Folders from
        before identities carry no digest and are checked on their records alone; a folder written under another
        identity version carries a digest this version cannot recompute, so only its records are checked.
        """
        record, unreadable = self._config_record()
        if record is None:
            return unreadable
        recorded = record.pop("identity", None) or {}
        try:
            key = setting(record, processes=recorded.get("processes", 1))
            seed = seed_of(record)
        except FsamError as error:
            return f"config.yaml does not check ({error})"
        summary = None
        if self.summary.exists():
            summary = read_json(self.summary)
            if summary is None:
                return "summary.json is not a JSON object (cut short or edited)"
        if recorded.get("identity_version", IDENTITY_VERSION) == IDENTITY_VERSION:
            digests, seeds = self._carried_identity(recorded, summary)
            computed = digest(key)
            wrong = _by_value({where: value for where, value in digests.items()
                               if value not in (computed, computed[:DIGEST_LENGTH])})
            if wrong:
                return f"config.yaml computes setting {computed[:DIGEST_LENGTH]}, but {wrong} (edited after the run)"
            wrong = _by_value({where: value for where, value in seeds.items() if value != seed})
            if wrong:
                return f"config.yaml has seed {seed}, but {wrong} (edited after the run)"
        if summary is not None:
            return self._metrics_problem(key["trainer"]["epochs"])
        return None

    def _config_record(self) -> tuple[dict[str, Any] | None, str | None]:
        """config.yaml as parsed, or None and why it cannot be."""
        if not self.config.exists():
            return None, "no config.yaml"
        try:
            record = yaml.safe_load(self.config.read_text())
        except OSError as error:
            return None, f"config.yaml cannot be read ({error.strerror})"
        except yaml.YAMLError:
            return None, "config.yaml is not valid YAML (cut short or edited)"
        if not isinstance(record, dict):
            return None, "config.yaml holds no config"
        return record, None

    def _carried_identity(
        self, recorded: Mapping[str, Any], summary: Mapping[str, Any] | None
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """The digests (whole, or a setting name's 12 hex digits) and the seeds this folder's records carry, each
        under where it is carried: config.yaml's identity, the folder name, summary.json."""
        digests: dict[str, str] = {}
        seeds: dict[str, Any] = {}
        if recorded.get("digest"):
            digests["its recorded identity"] = str(recorded["digest"])
        if "seed" in recorded:
            seeds["its recorded identity"] = recorded["seed"]
        named = NAMED_FOLDER.fullmatch(f"{self.path.parent.name}/{self.path.name}")
        if named:  # folders from before identities (<experiment>/<overrides>/seed<N>) have no digest in their name
            digests["the folder name"] = named["digest"]
            seeds["the folder name"] = int(named["seed"])
        if summary is not None:
            from_name = NAMED_SETTING.search(str(summary.get("setting", "")))
            if summary.get("setting_digest") or from_name:
                digests["summary.json"] = str(summary.get("setting_digest") or from_name["digest"])
            if "seed" in summary:
                seeds["summary.json"] = summary["seed"]
        return digests, seeds

    def _metrics_problem(self, epochs: int) -> str | None:
        """Why a finished run's metrics.jsonl is not its complete record of ``epochs`` epochs, or None."""
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError:
            return "finished, but metrics.jsonl is missing"
        rows = []
        for number, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                return f"metrics.jsonl line {number} is not JSON (cut short or edited)"
        seen = [row.get("epoch") if isinstance(row, dict) else None for row in rows]
        if seen != list(range(1, epochs + 1)):
            return f"finished, but metrics.jsonl holds epochs {seen or 'none'} where the config trains {epochs}"
        return None

    # --- writing (each one checks first that the folder is still the one this process locked)

    def write_config(self, identity: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        header = (
            "# The run's identity (what it computes; fsam/runfolder.py) and its checked config. Keys under identity\n"
            "# are records, not settings: the config below is what train.py and fsam.engine.run take.\n"
        )
        body = yaml.safe_dump({"identity": dict(identity), **config}, sort_keys=False)
        self._write(self.config, lambda: write_atomic(self.config, header + body))

    def append_launch(self, record: Mapping[str, Any]) -> None:
        self._write(self.launches, lambda: _append_line(self.launches, record))

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl hold exactly ``rows`` (on resume: the epochs the checkpoint has seen)."""
        self._write(self.metrics, lambda: write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows)))

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """One line, one write, flushed to disk: a reader sees a complete line or none."""
        self._write(self.metrics, lambda: _append_line(self.metrics, row))

    def write_status(self, status: Mapping[str, Any]) -> None:
        self._write(self.status, lambda: write_json_atomic(self.status, status))

    def write_summary(self, summary: Mapping[str, Any], epochs: int) -> None:
        """The summary, written only over complete records: ``epochs`` rows in metrics.jsonl, epoch 1 to N."""
        self.lock.check()
        seen = [row.get("epoch") for row in self.read_metrics()]
        if seen != list(range(1, epochs + 1)):
            raise RunFolderError(
                f"{self.metrics} holds epochs {seen or 'none'} where {epochs} were trained: the records are "
                "incomplete, so no summary is written; delete the folder and relaunch to train the run again"
            )
        self._write(self.summary, lambda: write_json_atomic(self.summary, summary))

    def _write(self, path: Path, write: Callable[[], None]) -> None:
        self.lock.check()
        try:
            write()
        except OSError as error:
            raise write_error(path, error, kept_checkpoints(self.checkpoints)) from None


def _by_value(carried: Mapping[str, Any]) -> str:
    """``{"the folder name": "ab", "summary.json": "ab"}`` -> ``the folder name and summary.json record ab``."""
    places: dict[str, list[str]] = {}
    for where, value in carried.items():
        places.setdefault(str(value)[:DIGEST_LENGTH], []).append(where)
    phrases = []
    for value, wheres in places.items():
        subject = f"{', '.join(wheres[:-1])} and {wheres[-1]} record" if len(wheres) > 1 else f"{wheres[0]} records"
        phrases.append(f"{subject} {value}")
    return "; ".join(phrases)


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


# --------------------------------------------------------------------------------------------- provenance


def git_commit() -> str | None:
    """The commit of the checkout the fsam package was imported from (``+dirty`` with local changes)."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if changes else "") if commit else None


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def identity_record(config: RunConfig, processes: int, model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What config.yaml and summary.json say the run is: its setting's name and digest, the seed, the number of
    processes, and (once built) the model as it is: name, completed kwargs, label and parameter count."""
    key = setting(config, processes)
    record = {
        "setting": setting_name(key),
        "digest": digest(key),
        "seed": config.trainer.seed,
        "processes": processes,
        "identity_version": IDENTITY_VERSION,
    }
    if model is not None:
        record["model"] = dict(model)
    return record


__all__ = [
    "FREE_KEYS", "IDENTITY_VERSION", "RunFolder", "RunFolderError", "RunHeldError", "RunLock", "default_run_dir", "differences",
    "digest", "identity_record", "model_kwargs", "processes_from_environment", "read_json", "read_metrics",
    "run_key", "setting", "setting_name", "write_atomic", "write_json_atomic",
]
