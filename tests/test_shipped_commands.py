"""Every train.py command line the project ships (README, docs, config comments, scripts, sbatch files) composes,
passes the schema, and gives one distinct run folder per job of its sweep: a documented sweep over methods trains
each method, never one method several times."""

from __future__ import annotations

import itertools
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fsam.config import load_config
from fsam.config.run_folder import register_resolver
from fsam.runfolder import default_run_dir, processes_from_environment

REPO = Path(__file__).resolve().parents[1]
register_resolver()

COMMAND = re.compile(r"(?:python3?|\$PYTHON|torchrun(?: --?\S+)*)\s+train\.py\b(.*)")
# Hydra's options that take the next word as their value; -cd points at a user's own configs (not shipped).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "-cn", "--config-name", "-cp", "--config-path",
                    "--experimental-rerun"}
USER_CONFIGS = {"-cd", "--config-dir"}


def shipped_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "train.py", *sorted((REPO / "docs").rglob("*.md")),
             *sorted((REPO / "results").glob("*/*/README.md")), *sorted((REPO / "configs").rglob("*.yaml")),
             *sorted(path for path in (REPO / "scripts").rglob("*") if path.is_file() and path.suffix != ".pyc")]
    return [path for path in files if path.exists()]


def logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined, comment markers and prompts stripped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*(#+|\$ |>>> )?\s*", "", raw)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def sbatch_scripts() -> dict[str, list[str]]:
    """Each sbatch file's own train.py arguments (its fixed part; the submit line adds the rest)."""
    scripts = {}
    for path in sorted((REPO / "scripts" / "slurm").glob("*.sbatch")):
        for line in logical_lines(path.read_text()):
            found = COMMAND.search(line)
            if found and line.lstrip().startswith("srun"):
                scripts[path.name] = shlex.split(found.group(1), comments=True)
    return scripts


def shipped_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every shipped train.py command; an sbatch usage line is its script's command with
    the usage's arguments added."""
    commands, scripts = [], sbatch_scripts()
    for path in shipped_files():
        for number, line in enumerate(logical_lines(path.read_text()), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            for found in COMMAND.finditer(line):
                # the train.py command only: not what a shell runs after it, nor the prose after inline code or after
                # a column of spaces in a commented example
                tail = re.split(r"\s(?:&&|\|\||;|\|)\s|`|\s{3,}", found.group(1))[0]
                commands.append((where, shlex.split(tail, comments=True)))
            usage = re.search(r"sbatch\b.*?scripts/slurm/(\S+\.sbatch)(.*)", line)
            if usage and usage.group(1) in scripts and not line.lstrip().startswith("#SBATCH"):
                commands.append((where, [*scripts[usage.group(1)], *shlex.split(usage.group(2), comments=True)]))
    return commands


def jobs_of(arguments: list[str]) -> list[tuple[str, ...]] | None:
    """The jobs a command runs (a sweep expanded as Hydra's sweeper does), or None for a command that needs what
    the project does not ship (its own config folder, a placeholder)."""
    overrides, skip, multirun = [], False, False
    for word in arguments:
        if skip:
            skip = False
        elif word in USER_CONFIGS or any(mark in word for mark in ("<", "...", "…")):
            return None
        elif word in ("-m", "--multirun"):
            multirun = True
        elif word in FLAGS_WITH_VALUE:
            skip = True
        elif word.startswith("-") or "$" in word or word.startswith(("hydra/", "hydra.")):
            continue  # Hydra's and the launcher's options, shell variables: they do not change a run
        elif "=" in word:
            overrides.append(word)
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            assert multirun, f"{text} sweeps without -m"
            key = text.split("=", 1)[0]
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [tuple(job) for job in itertools.product(*choices)]


@lru_cache(maxsize=None)
def folder_of(job: tuple[str, ...]) -> Path:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        plain = OmegaConf.to_container(compose("train", overrides=list(job)), resolve=True)
    if plain.get("run_dir"):
        load_config(plain)
        return Path(plain["run_dir"])
    return default_run_dir(plain, processes_from_environment())


COMMANDS = shipped_commands()


def test_the_shipped_commands_are_found_where_users_read_them():
    places = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "scripts/slurm/sweep.sh", "scripts/slurm/single_gpu.sbatch", "scripts/slurm/multi_node.sbatch",
            "configs/train.yaml", "configs/hydra/launcher/slurm.yaml", "train.py"} <= places
    sweeps = [arguments for where, arguments in COMMANDS if where.startswith("scripts/slurm/sweep.sh")]
    assert any("optimizer=sgd,sam,fsam" in arguments for arguments in sweeps)


@pytest.mark.parametrize("where, arguments", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_shipped_command_gives_one_distinct_folder_per_job(where, arguments):
    jobs = jobs_of(arguments)
    if jobs is None:
        pytest.skip(f"{where} needs a config folder or value of the user's own")
    folders = [folder_of(job) for job in jobs]
    repeated = {folder for folder in folders if folders.count(folder) > 1}
    assert not repeated, f"{where}: jobs {[' '.join(job) for job, f in zip(jobs, folders) if f in repeated]} " \
                         f"share {sorted(map(str, repeated))}"
