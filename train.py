"""Train one run, or a sweep with -m: compose the configs, validate them, hand them to the engine.

    python train.py experiment=quickstart                        # digits on the CPU, about a minute
    python train.py optimizer=sam dataset=cifar10 trainer.epochs=100
    python train.py -m optimizer=sgd,sam,fsam trainer.seed=1,2,3 # one run folder per combination
    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu optimizer=sgd,fsam
    python train.py -m optimizer=sgd,sam,fsam trainer.seed=1,2,3 --dry-run  # each job's folder and state; trains nothing

Each run lives in runs/<setting>/seed<seed>/ (FSAM_RUNS replaces runs/), where <setting> is named by what the run
computes (fsam/runfolder.py): the same settings find the same folder however they are typed, so relaunching
continues an unfinished run and skips a finished one, and a changed setting trains anew in its own folder. One
process holds a run folder at a time; a second launch is refused. A problem the user can fix (a bad value, an
unknown option, missing data, a diverged run, a folder in use) prints ``error: <message>`` on one line and exits
with status 2; anything else is a bug and keeps its traceback. A sweep checks every job before the first starts,
reports how each job ended as it does (hydra_plugins/fsam_launchers), and exits with status 2 unless every job
finished or was skipped as finished. SIGTERM, SIGUSR1, SIGUSR2 (a preempted or timed-out
SLURM job) and Ctrl-C checkpoint the run at the next step and exit with 128 + the signal's number.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import signal
import sys
import tempfile
import time
import typing
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins import fsam_launchers
from hydra_plugins.fsam_launchers.jobs import JobOutcome, check_method_choice, first_line, outcome_of_error
from fsam.config import RunConfig, load_config, run_folder
from fsam.errors import ConfigError, FsamError, Interrupted
from fsam.runfolder import RunFolder, runs_root

CONFIGS = Path(__file__).resolve().parent / "configs"
GROUPS = ("model", "dataset", "optimizer", "schedule", "logger", "experiment")


# Whether a single run stopped with a user error (already reported): main() then exits with status 2.
FAILED = False


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def train(cfg: DictConfig) -> JobOutcome:
    """One job; returns how it ended (finished or skipped), with its best validation top-1 as the objective that
    ``hydra/sweeper=optuna`` maximises. A job that cannot finish raises: in a sweep, the launcher reports it and
    goes on with the other jobs (fsam_launchers)."""
    # A submitit job unpickles this function in a fresh process, importing the modules it names; naming
    # run_folder here registers the folder-name resolver there before Hydra resolves the job's folder.
    global FAILED
    run_folder.register_resolver()
    started, outcome, message = time.monotonic(), "failed", ""
    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain.get("run_dir") is None:
        plain["run_dir"] = HydraConfig.get().runtime.output_dir  # the folder Hydra resolved from the setting
    try:
        hydra_config = HydraConfig.get()
        check_method_choice(list(hydra_config.overrides.task), plain, hydra_config.runtime.config_sources)
        config = load_config(plain)
        check_tuning(config)
        from fsam.engine import run  # only now: a bad value is refused before torch loads (seconds sooner)

        outcome = "skipped" if RunFolder(config.run_dir).finished_summary() is not None else "finished"
        summary = run(config)
        return JobOutcome(outcome, config.run_dir, summary.get("best_val_top1"))
    except Interrupted as stop:
        outcome, message = "stopped", str(stop)
        raise
    except FsamError as error:
        outcome, message = outcome_of_error(error), one_line(error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher reports it with the job's name and goes on with the other jobs
        report(message)  # a single run: one line (Hydra would add its own before re-raising)
        FAILED = True
        return JobOutcome(outcome, str(plain["run_dir"]))
    except Exception as error:
        message = first_line(error)
        raise
    finally:
        reported = fsam_launchers.job_ended(outcome, time.monotonic() - started, message)
        if not reported and message and outcome != "stopped" and HydraConfig.get().mode == RunMode.MULTIRUN:
            report(message)  # a submitit job: its log says why it did not finish (the launcher reads its result)


def check_tuning(config: RunConfig) -> None:
    """A search (Hydra's Optuna sweeper) maximises validation accuracy; without a validation split it would have
    to look at the test split, so it is refused."""
    if HydraConfig.get().runtime.choices.get("hydra/sweeper") == "optuna" and not config.dataset.val_split:
        raise ConfigError(
            "hydra/sweeper=optuna maximises validation top-1, and this run has no validation split: add "
            "dataset.val_split=N (N training images held out), never tune on the test split"
        )


# Hydra's own options that take the next argument as their value (never an override to check).
HYDRA_FLAGS_WITH_VALUE = {
    "-sc", "--shell-completion", "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir",
    "--experimental-rerun", "-p", "--package", "--info", "-i",
}


def check_arguments(arguments: list[str]) -> None:
    """Refuse unknown keys and unknown options of a config group in plain ``key=value`` overrides, with the
    list of what is known (Hydra's own message would only say it could not override). Hydra's flags and their
    values, and arguments Hydra cannot parse, are left to Hydra."""
    parser = OverridesParser.create()
    config_dirs, flag = [CONFIGS], None
    for argument in arguments:
        if flag is not None or argument.startswith("-") or "=" not in argument:
            if flag in ("-cd", "--config-dir"):
                config_dirs.append(Path(argument))
            elif argument.startswith("--config-dir="):
                config_dirs.append(Path(argument.split("=", 1)[1]))
            flag = argument if flag is None and argument in HYDRA_FLAGS_WITH_VALUE else None
            continue
        try:
            override = parser.parse_override(argument)
        except HydraException:
            continue
        check_group_option(override, config_dirs)
        check_key(override)


def check_key(override: Override) -> None:
    """A ConfigError naming the known keys (and the closest one) when a plain override sets a key the schema
    does not have; Hydra's own message would only say it could not override it. ``+key=value`` is left to the
    schema check, ``hydra.*`` to Hydra."""
    key = override.key_or_group
    if override.is_add() or override.is_force_add() or override.is_delete() or "/" in key:
        return
    if key in GROUPS or key.split(".")[0] == "hydra":
        return
    node: type = RunConfig
    for depth, part in enumerate(key.split(".")):
        fields = [field.name for field in dataclasses.fields(node)]
        if part not in fields:
            parent = ".".join(key.split(".")[:depth]) or "the top level"
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key} is not a known key{hint}: the keys under {parent} are {', '.join(fields)}")
        kind = typing.get_type_hints(node)[part]
        if not (dataclasses.is_dataclass(kind) and isinstance(kind, type)):
            return  # a value (model.kwargs takes any key)
        node = kind


def check_group_option(override: Override, config_dirs: list[Path]) -> None:
    """A ConfigError listing the options when a config group is set to an option that has no file in configs/ or
    a folder added with --config-dir."""
    group = override.key_or_group
    if group not in GROUPS or override.is_delete():
        return
    if override.is_sweep_override():
        values = list(override.sweep_string_iterator())
    else:
        values = [override.get_value_element_as_str()]
    options = sorted({path.stem for folder in config_dirs for path in (folder / group).glob("*.yaml")
                      if not path.stem.startswith("_")})  # _common.yaml: what a group's options share
    for value in values:
        if value not in options and value != "null":
            raise ConfigError(
                f"{group}={value} is not an option of {group}: choose one of {', '.join(options)} "
                f"(files in configs/{group}/)"
            )


def check_launcher(arguments: list[str]) -> None:
    """Refuse the SLURM launcher where SLURM is not installed (submitit would fail with a traceback)."""
    if "hydra/launcher=slurm" in arguments and shutil.which("srun") is None:
        raise ConfigError(
            "hydra/launcher=slurm needs SLURM (srun and sbatch on PATH): run the command on the cluster's login "
            "node, or try the sweep on this machine with hydra/launcher=local"
        )


def check_output_root() -> None:
    """Refuse, before Hydra or the engine writes anything, a runs folder that cannot be created or written."""
    root = runs_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"the runs folder {root.resolve()} cannot be written ({error.strerror or error}): set FSAM_RUNS to a "
            "writable folder, e.g. FSAM_RUNS=$HOME/fsam-runs"
        ) from None


def one_line(error: BaseException) -> str:
    """The error's message and, for Hydra's wrappers, its cause's, on one line; an FsamError raised inside Hydra
    (the run-folder resolver checks the config) is shown alone."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, FsamError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    parts = [str(error)]
    if isinstance(error, HydraException) and error.__cause__ is not None:
        parts.append(str(error.__cause__))
    noise = ("full_key:", "object_type=", "reference_type=")
    lines = [line.strip() for part in parts for line in part.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(noise))


def report(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def dry_run(arguments: list[str]) -> list[str]:
    """The arguments that preview a command's jobs instead of running them: the same overrides, in multirun mode
    (so a sweep is expanded by Hydra's own sweeper), with the preview launcher in place of any other."""
    kept = [argument for argument in arguments
            if argument != "--dry-run" and not argument.startswith(("hydra/launcher=", "hydra.launcher."))]
    launcher = {key: int(value) for key, value in (argument.split("=", 1) for argument in arguments
                if argument.startswith(("hydra.launcher.tasks_per_node=", "hydra.launcher.nodes=")))
                if value.isdigit()}
    processes = launcher.get("hydra.launcher.tasks_per_node", 1) * launcher.get("hydra.launcher.nodes", 1)
    mode = [] if {"-m", "--multirun"} & set(kept) else ["-m"]
    return [*mode, *kept, "hydra/launcher=preview", f"hydra.launcher.processes={processes}"]


def main() -> int:
    # Hydra prints its own errors and exits with status 1 unless HYDRA_FULL_ERROR is set; with it set, they reach
    # the handler below, like the engine's.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    scratch = None
    try:
        if "--dry-run" in sys.argv[1:]:
            # Hydra's sweeper writes multirun.yaml into the sweep folder: a preview's goes to a scratch folder.
            scratch = tempfile.mkdtemp(prefix="fsam-dry-run-")
            sys.argv[1:] = [*dry_run(sys.argv[1:]), f"hydra.sweep.dir={scratch}"]
        check_arguments(sys.argv[1:])
        if scratch is None:
            check_output_root()
        check_launcher(sys.argv[1:])
        train()
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        return stop.exit_status
    except KeyboardInterrupt:
        print("stopped: Ctrl-C twice, without waiting for the step to end; relaunch the same command to continue "
              "from the last checkpoint", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except (FsamError, HydraException, OmegaConfBaseException) as error:
        report(one_line(error))
        return 2
    except ValueError as error:
        if not fsam_launchers.UNFINISHED or "No trials are completed yet" not in str(error):
            raise
        # Optuna has no best trial to report when none finished; each was reported as it ended.
        report(f"no trial of this search finished: {'; '.join(fsam_launchers.UNFINISHED)}")
        return 2
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if fsam_launchers.UNFINISHED:  # a search that went on past trials that did not finish
        report(f"{len(fsam_launchers.UNFINISHED)} trials of this search did not finish: "
               + "; ".join(fsam_launchers.UNFINISHED))
        return 2
    return 2 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
