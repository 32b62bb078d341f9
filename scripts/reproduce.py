"""List, check or launch a named grid of runs: one command for a whole table.

    python scripts/reproduce.py --grid digits --dry-run            # the commands, and the state of every cell
    python scripts/reproduce.py --grid digits --status             # finished / running / diverged / missing
    python scripts/reproduce.py --grid digits --seeds 3            # train what is missing, one sweep per block
    python scripts/reproduce.py --grid cifar100_resnet18 --launcher slurm -- hydra.launcher.partition=gpu

A grid is a list of blocks; a block is one ``train.py -m`` sweep (comma lists in its overrides), run with
``trainer.seed=1..N``. Relaunching a grid skips its finished runs and continues the unfinished ones (run
folders are named by what they compute). Extra arguments after ``--`` go to every sweep.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (what it reproduces, blocks of overrides). Comma lists are swept; seeds are added by --seeds.
GRIDS: dict[str, tuple[str, list[list[str]]]] = {
    "digits": (
        "the reproduction that runs on 2 CPU cores: digits clean and with 20 % and 40 % symmetric label noise, "
        "SGD, SAM and F-SAM (the quick start's network and recipe, 10 epochs)",
        [
            ["experiment=quickstart", "optimizer=sgd,sam,fsam"],
            ["experiment=quickstart", "optimizer=sgd,sam,fsam", "dataset.noise.kind=symmetric",
             "dataset.noise.ratio=0.2,0.4"],
        ],
    ),
    "cifar100_resnet18": (
        "the release's CIFAR-100 ResNet-18 recipe (experiment=paper_cifar100_resnet18) for SGD, SAM and F-SAM",
        [["experiment=paper_cifar100_resnet18", "optimizer=sgd,sam,fsam"]],
    ),
}
# The paper's Figure-1 analysis: SAM's ascent along the minibatch gradient, the full-batch gradient alone, or the
# minibatch gradient's part orthogonal to it (docs/algorithm.md, "The perturbation's two parts").
GRIDS["figure1"] = (
    "the paper's Figure 1: SAM (rho 0.2) on the released CIFAR-100 ResNet-18 recipe, perturbed along the minibatch "
    "gradient, the full gradient only, or the noise part only (experiment=paper_figure1_cifar100_resnet18)",
    [["experiment=paper_figure1_cifar100_resnet18", "optimizer.perturbation=minibatch,full,noise"]],
)
GRIDS["figure1_digits"] = (
    "the paper's Figure-1 analysis on digits at quick-start size: SAM (rho 0.2) perturbed along the minibatch "
    "gradient, the full gradient only, or the noise part only (experiment=figure1_digits, 10 epochs)",
    [["experiment=figure1_digits", "optimizer.perturbation=minibatch,full,noise"]],
)


def expand(block: list[str]) -> list[list[str]]:
    """The single runs of a block: each ``key=a,b`` swept, in order."""
    choices = [[f"{item.split('=', 1)[0]}={value}" for value in item.split("=", 1)[1].split(",")] for item in block]
    return [list(combination) for combination in itertools.product(*choices)]


def run_folder(overrides: list[str]) -> Path:
    """The folder train.py would train these overrides in (composed with the real configs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fsam.config.run_folder import register_resolver
    from fsam.runfolder import default_run_dir

    register_resolver()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        config = compose("train", overrides=overrides)
    return default_run_dir(OmegaConf.to_container(config, resolve=True))


def state_of(folder: Path) -> str:
    from fsam.runfolder import RunFolder

    return RunFolder(folder).state() if folder.exists() else "missing"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, choices=sorted(GRIDS), help="which grid")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N of every setting")
    parser.add_argument("--launcher", default="inprocess", choices=["inprocess", "local", "slurm"],
                        help="inprocess: one run after the other here; local/slurm: submitit jobs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and each cell's state")
    parser.add_argument("--status", action="store_true", help="print each cell's state only")
    parser.add_argument("extra", nargs="*", help="after --: more overrides for every sweep")
    args = parser.parse_args()

    description, blocks = GRIDS[args.grid]
    seeds = ",".join(str(seed) for seed in range(1, args.seeds + 1))
    commands = [
        [sys.executable, "train.py", "-m", f"hydra/launcher={args.launcher}", *block, f"trainer.seed={seeds}", *args.extra]
        for block in blocks
    ]
    print(f"grid {args.grid}: {description}")
    if args.dry_run or args.status:
        counts: dict[str, int] = {}
        for block in blocks:
            for overrides in expand([*block, f"trainer.seed={seeds}", *args.extra]):
                folder = run_folder(overrides)
                state = state_of(folder)
                counts[state] = counts.get(state, 0) + 1
                print(f"{state:10s} {folder}  ({' '.join(overrides)})")
        print("cells: " + ", ".join(f"{count} {state}" for state, count in sorted(counts.items())))
        if args.dry_run:
            for command in commands:
                print("would run: " + " ".join(command[1:]))
        return 0
    for command in commands:
        print("running: " + " ".join(command[1:]), flush=True)
        result = subprocess.run(command, cwd=REPO, env=dict(os.environ))
        if result.returncode != 0:
            print(f"error: the sweep exited with status {result.returncode}; relaunch the same command to continue "
                  "(finished runs are skipped)", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
