"""List, check or launch a named grid of runs: one command for a whole table.

    python scripts/reproduce.py --grid digits --dry-run            # the commands, and the state of every cell
    python scripts/reproduce.py --grid digits --status             # finished / running / diverged / missing
    python scripts/reproduce.py --grid digits --seeds 3            # train what is missing, one sweep per block
    python scripts/reproduce.py --grid cifar100_resnet18 --launcher slurm -- hydra.launcher.partition=gpu
    python scripts/reproduce.py --grid all --dry-run --seeds 1     # every paper grid, and its GPU-hours estimate
    python scripts/reproduce.py --grid digits_noise_sharpness --parallel 2   # a study's analysis stage

A grid is a list of blocks; a block is one ``train.py -m`` sweep (comma lists in its overrides), run with
``trainer.seed=1..N``. Relaunching a grid skips its finished runs and continues the unfinished ones (run
folders are named by what they compute). Extra arguments after ``--`` go to every sweep. A paper grid's cells
are experiment files (configs/experiment/paper_*.yaml), one per table entry; ablations sweep values on one of them.
The GPU-hours estimate uses only GPU step throughput measured by scripts/bench_train.py (results/benchmarks.md)
and says "not measured" for everything else.

Every cell is composed with the real configs before anything is listed or launched, so a bad value or key after
``--`` (or a bad ``--seeds``) is one line, ``error: <what and how to fix it>``, and exit status 2, as train.py says it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

from fsam.config.compose import compose_cells, compose_runs
from fsam.errors import ConfigError, FsamError
from fsam.study import STUDIES, Study, heatmap_blocks, seed_blocks

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # train.py's checks and messages, from the checkout whose train.py runs the sweeps

CIFAR_MODELS = ("resnet18", "wrn28_10", "pyramidnet110", "vgg16_bn")
NOISE_LEVELS = ("sym20", "sym40", "sym60", "sym80", "asym40")


def experiments(*names: str) -> str:
    """One override sweeping experiment files (configs/experiment/<name>.yaml)."""
    return "experiment=" + ",".join(names)


def cifar_table(dataset: str) -> list[list[str]]:
    """A block per network: SGD, SAM, F-SAM, ASAM and F-ASAM with the release's recipe."""
    methods = ("sgd", "sam", "fsam", "asam", "fasam")
    return [[experiments(*(f"paper_{dataset}_{model}_{method}" for method in methods))] for model in CIFAR_MODELS]


# At sigma = 1 (and lambda > 0) the two EMA orders give the same direction, so the runs share a folder (the
# identity drops ema_order there): the paper order is swept only where it computes something else. In the paper
# order at lambda = 0 the EMA is the current gradient, so d = (1 - sigma) g: SAM's direction (sigma < 1), no
# perturbation at all (sigma = 1: SGD at SAM's cost) or SAM's reversed, downhill (sigma > 1); none is F-SAM, so
# that row is left out (docs/algorithm.md, "One step").
ABLATION_LAMBDA_SIGMA = [
    ["experiment=paper_cifar100_resnet18_fsam", "optimizer.lmbda=0,0.3,0.6,0.9,0.95,0.99",
     "optimizer.sigma=0.5,1,1.5,2", "optimizer.ema_order=code"],
    ["experiment=paper_cifar100_resnet18_fsam", "optimizer.lmbda=0.3,0.6,0.9,0.95,0.99", "optimizer.sigma=0.5,1.5,2",
     "optimizer.ema_order=paper"],
]

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
        "the release's CIFAR-100 ResNet-18 hyperparameters with this project's initialisation and the last batch "
        "dropped (experiment=paper_cifar100_resnet18) for SGD, SAM and F-SAM, all with its rho 0.2",
        [["experiment=paper_cifar100_resnet18", "optimizer=sgd,sam,fsam"]],
    ),
    "cifar10": (
        "CIFAR-10: ResNet-18, WRN-28-10, PyramidNet-110 and VGG16-BN (the release's networks and initialisation) "
        "x SGD, SAM, F-SAM, ASAM, F-ASAM, the release's recipe",
        cifar_table("cifar10"),
    ),
    "cifar100": (
        "CIFAR-100: ResNet-18, WRN-28-10, PyramidNet-110 and VGG16-BN (the release's networks and initialisation) "
        "x SGD, SAM, F-SAM, ASAM, F-ASAM, the release's recipe",
        cifar_table("cifar100"),
    ),
    "label_noise": (
        "CIFAR-10 with 20/40/60/80 % symmetric and 40 % asymmetric label noise, ResNet-18, SGD, SAM and F-SAM",
        [[experiments(*(f"paper_cifar10_{noise}_resnet18_{method}" for method in ("sgd", "sam", "fsam")))]
         for noise in NOISE_LEVELS],
    ),
    "imagenet": (
        "ImageNet, ResNet-50, SGD, SAM and F-SAM (SAM's ImageNet recipe: base/imagenet_resnet50.yaml)",
        [[experiments("paper_imagenet_resnet50_sgd", "paper_imagenet_resnet50_sam", "paper_imagenet_resnet50_fsam")]],
    ),
    "vit": (
        "DeiT-S/16 fine-tuned on CIFAR-10 and CIFAR-100, and a ViT-S/4 from scratch on CIFAR-10, each with AdamW "
        "alone, SAM and F-SAM on an AdamW base",
        [
            [experiments("paper_cifar10_deit_small_adamw", "paper_cifar10_deit_small_sam",
                         "paper_cifar10_deit_small_fsam")],
            [experiments("paper_cifar100_deit_small_adamw", "paper_cifar100_deit_small_sam",
                         "paper_cifar100_deit_small_fsam")],
            [experiments("cifar10_vit_scratch_adamw", "cifar10_vit_scratch_sam", "cifar10_vit_scratch_fsam")],
        ],
    ),
    "ablation_lambda_sigma": (
        "F-SAM on CIFAR-100 ResNet-18 (the release's recipe): lambda 0-0.99 x sigma 0.5-2 in both EMA orders (at "
        "sigma 1 the orders agree, so those runs are the code order's; the paper order's lambda 0, where the "
        "direction is (1 - sigma) g, not F-SAM's, is left out)",
        ABLATION_LAMBDA_SIGMA,
    ),
    "ablation_rho": (
        "SAM and F-SAM on CIFAR-100 ResNet-18 (the release's recipe) at rho 0.05-0.5",
        [[experiments("paper_cifar100_resnet18_sam", "paper_cifar100_resnet18_fsam"),
          "optimizer.rho=0.05,0.1,0.2,0.3,0.4,0.5"]],
    ),
}
# The paper's Figure-1 analysis: SAM's ascent along the minibatch gradient, the full-batch gradient alone, or the
# minibatch gradient's part orthogonal to it (docs/algorithm.md, "The perturbation's two parts").
GRIDS["figure1"] = (
    "the paper's Figure 1: SAM (rho 0.2) with the release's CIFAR-100 ResNet-18 recipe, perturbed along the minibatch "
    "gradient, the full gradient only, or the noise part only (experiment=paper_figure1_cifar100_resnet18)",
    [["experiment=paper_figure1_cifar100_resnet18", "optimizer.perturbation=minibatch,full,noise"]],
)
GRIDS["figure1_digits"] = (
    "the paper's Figure-1 analysis on digits at quick-start size: SAM (rho 0.2) perturbed along the minibatch "
    "gradient, the full gradient only, or the noise part only (experiment=figure1_digits, 10 epochs)",
    [["experiment=figure1_digits", "optimizer.perturbation=minibatch,full,noise"]],
)
PAPER_GRIDS = ("cifar10", "cifar100", "label_noise", "imagenet", "vit", "ablation_lambda_sigma", "ablation_rho")
GRIDS["all"] = (
    "every paper grid: " + ", ".join(PAPER_GRIDS) + " (a run two grids share trains once)",
    [block for name in PAPER_GRIDS for block in GRIDS[name][1]],
)


def study_grids(study: Study) -> dict[str, tuple[str, list[list[str]] | Callable[[], list[list[str]]]]]:
    """A study's three stages as grids: its tuning trials; then, read from the tuning runs' records, each method's
    choice at seeds 1..N and F-SAM's lambda x sigma around its choice (fsam/study.py; the protocol in docs/)."""
    return {
        f"{study.name}_tune": (
            f"the {study.name} study's tuning stage: {study.trials} trials per method and condition "
            f"({', '.join(study.search)} x {', '.join(study.conditions)}) on the validation split, seed 1",
            [overrides for _, _, overrides in study.tuning_cells()],
        ),
        f"{study.name}_seeds": (
            f"the {study.name} study's seed stage: each method's trial with the highest {study.select} in each "
            f"condition, at seeds 1..{study.seeds} (needs the tuning stage)",
            lambda: seed_blocks(study, compose_runs),
        ),
        f"{study.name}_sharpness": (
            f"the {study.name} study's analysis: the seed stage's final weights measured by scripts/sharpness.py "
            f"{' '.join(study.sharpness)} (here, with --parallel, or one job per run with --launcher local/slurm; "
            "arguments after -- go to sharpness.py)",
            lambda: seed_blocks(study, compose_runs),
        ),
        f"{study.name}_heatmap": (
            f"the {study.name} study's F-SAM lambda x sigma at {study.heatmap_condition}, every other value at F-SAM's "
            f"choice there, seeds 1..{study.heatmap_seeds} (needs the tuning stage)",
            lambda: heatmap_blocks(study, compose_runs),
        ),
    }


# How many seeds each study stage runs unless --seeds says otherwise (3 for the other grids).
GRID_SEEDS = {}
STUDY_GRIDS = set()
ANALYSIS_GRIDS: dict[str, Study] = {}  # grids that measure runs (scripts/sharpness.py) rather than train them
for _study in STUDIES.values():
    GRIDS.update(study_grids(_study))
    STUDY_GRIDS.update(study_grids(_study))
    ANALYSIS_GRIDS[f"{_study.name}_sharpness"] = _study
    GRID_SEEDS.update({f"{_study.name}_tune": 1, f"{_study.name}_seeds": _study.seeds,
                       f"{_study.name}_sharpness": _study.seeds, f"{_study.name}_heatmap": _study.heatmap_seeds})


def blocks_of(grid: str) -> list[list[str]]:
    """A grid's blocks; a study stage that depends on earlier records reads them now (FsamError if missing)."""
    blocks = GRIDS[grid][1]
    return blocks() if callable(blocks) else blocks

# Training examples per epoch, for the GPU-hours estimate (dataset.train_subset replaces them).
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "digits": 1_437, "imagenet": 1_281_167}
BENCHMARKS = REPO / "results" / "benchmarks.md"


def expand(block: list[str]) -> list[list[str]]:
    """The single runs of a block, each sweep in order as Hydra's basic sweeper reads it: ``key=a,b`` and
    ``key=range(1,4)`` are swept, a list ``key=[a,b]`` is one value. ConfigError for an argument that is not an
    override (``--flag``, a word without ``=``) or a sweep that cannot be listed (``interval(0,1)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    choices = []
    for item in block:
        try:
            override = parser.parse_override(item)
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                raise HydraException("a glob sweep, whose options only Hydra's config loader knows")
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else None
        except HydraException as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"{item!r} is not an override whose runs can be listed ({reason}): give key=value or a sweep "
                "key=a,b, e.g. trainer.epochs=2"
            ) from None
        choices.append([item] if values is None else [f"{override.get_key_element()}={value}" for value in values])
    return [list(combination) for combination in itertools.product(*choices)]


def grid_cells(blocks: list[list[str]], common: list[str]) -> list[list[str]]:
    """The single runs of every block, each with the ``common`` overrides (the seeds, the arguments after --)."""
    return [cell for block in blocks for cell in expand([*block, *common])]


def run_folder(overrides: list[str]) -> Path:
    """The folder train.py would train these overrides in (composed with the real configs)."""
    from fsam.runfolder import default_run_dir

    return default_run_dir(compose_cells([overrides])[0])


def measured_throughput(path: Path = BENCHMARKS) -> dict[tuple, float]:
    """Images/s of whole training steps measured on a GPU, from the sections scripts/bench_train.py appends to
    ``path``: (model, method, batch size, precision, channels_last, compile) -> images/s, the latest section
    winning. CPU sections are left out (they say nothing about GPU-hours). The benchmark's images are 32 px."""
    if not path.exists():
        return {}
    measured: dict[tuple, float] = {}
    on_gpu, measurement = False, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            on_gpu, measurement = not line.split(": ", 1)[-1].startswith("CPU"), None
        elif line.startswith("- model ") and on_gpu:
            found = re.match(r"- model (\S+) \(\d+ classes\), batch (\d+), precision (\w+), channels_last (\w+), "
                             r"compile (\w+)", line)
            measurement = found and (found[1], int(found[2]), found[3], found[4] == "True", found[5] == "True")
        elif line.startswith("| ") and measurement:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if len(cells) >= 3 and cells[0] in ("sgd", "sam", "fsam") and cells[2].isdigit():
                model, batch, precision, channels_last, compiled = measurement
                measured[(model, cells[0], batch, precision, channels_last, compiled)] = float(cells[2])
    return measured


def gpu_hours(configs: list[dict], measured: dict[tuple, float]) -> str:
    """One line: the GPU-hours of the runs whose model, method, batch size, precision, memory format and compile
    setting have a measured GPU throughput (32 px images only: the benchmark's), and what is not measured.
    Whole training steps only: data loading and evaluation are not counted."""
    hours, counted, missing = 0.0, 0, set()
    for config in configs:
        trainer, dataset = config["trainer"], config["dataset"]
        key = (config["model"]["name"], config["optimizer"]["name"], trainer["batch_size"], trainer["amp"],
               trainer["channels_last"], trainer["compile"])
        images_per_second = measured.get(key) if dataset["image_size"] == 32 else None
        if images_per_second is None:
            missing.add(f"{key[0]} (batch {key[2]}, precision {key[3]}, {dataset['image_size']} px)")
            continue
        examples = dataset["train_subset"] or TRAIN_EXAMPLES[dataset["name"]]
        hours += trainer["epochs"] * examples / images_per_second / 3600
        counted += 1
    if not missing:
        return f"GPU-hours: {hours:.1f} for all {counted} runs (measured step throughput in results/benchmarks.md)"
    not_measured = (f"not measured for {len(configs) - counted} of {len(configs)} runs (no GPU step throughput in "
                    f"results/benchmarks.md for their method on {', '.join(sorted(missing))})")
    if counted == 0:
        return f"GPU-hours: {not_measured}"
    return f"GPU-hours: {hours:.1f} for {counted} runs (measured step throughput in results/benchmarks.md); {not_measured}"


def state_of(folder: Path) -> str:
    from fsam.runfolder import RunFolder

    return RunFolder(folder).state() if folder.exists() else "missing"


def print_status(cells: list[list[str]], composed: list[tuple[Path, dict]]) -> None:
    """A line per run (its state, folder and overrides), the count of each state, and the GPU-hours estimate.
    Cells with equal settings (two grids sharing a run) are one run, listed once."""
    runs: dict[Path, dict] = {}
    counts: dict[str, int] = {}
    for cell, (folder, config) in zip(cells, composed):
        if folder in runs:
            continue
        runs[folder] = config
        state = state_of(folder)
        counts[state] = counts.get(state, 0) + 1
        print(f"{state:10s} {folder}  ({' '.join(cell)})")
    shared = len(cells) - len(runs)
    print("cells: " + ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
          + (f" ({shared} more cells are runs listed above: the same setting)" if shared else ""))
    print(gpu_hours(list(runs.values()), measured_throughput()))


def main() -> int:
    grids = "\n".join(textwrap.fill(f"{name}: {description}", 110, initial_indent="  ", subsequent_indent="      ")
                      for name, (description, _) in GRIDS.items())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"grids:\n{grids}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, choices=sorted(GRIDS), help="which grid (listed below)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds 1..N of every setting (default: the study stage's own, else 3)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="inprocess: run this many of the grid's sweeps at once, each with one thread "
                             "(OMP_NUM_THREADS=1 unless set), e.g. 2 on 2 cores")
    parser.add_argument("--launcher", default="inprocess", choices=["inprocess", "local", "slurm"],
                        help="inprocess: one run after the other here; local/slurm: submitit jobs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and each cell's state")
    parser.add_argument("--status", action="store_true", help="print each cell's state only")
    parser.add_argument("extra", nargs="*", help="after --: more overrides for every sweep")
    args = parser.parse_args()

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train import check_arguments, check_launcher, one_line, report

    if args.seeds is None:
        args.seeds = GRID_SEEDS.get(args.grid, 3)
    if args.parallel < 1:
        report(f"--parallel {args.parallel} is not allowed: give how many sweeps run at once, 1 or more")
        return 2
    if args.seeds < 1:
        report(f"--seeds {args.seeds} is not allowed: give how many seeds each setting trains, 1 or more "
               "(--seeds N trains seeds 1 to N)")
        return 2
    description = GRIDS[args.grid][0]
    try:
        blocks = blocks_of(args.grid)
    except FsamError as error:
        report(str(error))
        return 2
    seeds = ",".join(str(seed) for seed in range(1, args.seeds + 1))
    commands = [
        [sys.executable, "train.py", "-m", f"hydra/launcher={args.launcher}", *block, f"trainer.seed={seeds}", *args.extra]
        for block in blocks
    ]
    print(f"grid {args.grid}: {description}")
    if args.grid in ANALYSIS_GRIDS:
        return measure_grid(ANALYSIS_GRIDS[args.grid], blocks, seeds, args)
    try:
        cells = grid_cells(blocks, [f"trainer.seed={seeds}", *args.extra])
        check_arguments(args.extra)  # an unknown key or option, in train.py's words
        composed = compose_runs(cells)  # every cell, before anything is listed or launched
        if not (args.dry_run or args.status):
            check_launcher([f"hydra/launcher={args.launcher}"])
    except (FsamError, HydraException, OmegaConfBaseException) as error:
        report(one_line(error))
        return 2
    if args.dry_run or args.status:
        print_status(cells, composed)
        if args.dry_run:
            for command in commands:
                print("would run: " + " ".join(command[1:]))
        return 0
    return run_sweeps(commands, args.parallel)


def measure_grid(study: Study, blocks: list[list[str]], seeds: str, args: argparse.Namespace) -> int:
    """The analysis stage: the runs of ``blocks`` (the seed stage's) measured by scripts/sharpness.py, in one
    command (here, ``--parallel`` processes, or one job per run); --status says which runs are measured."""
    from train import one_line, report

    try:
        composed = compose_runs(grid_cells(blocks, [f"trainer.seed={seeds}"]))
    except FsamError as error:
        report(one_line(error))
        return 2
    folders = list(dict.fromkeys(folder for folder, _ in composed))
    launcher = {"inprocess": "here"}.get(args.launcher, args.launcher)
    command = [sys.executable, str(REPO / "scripts" / "sharpness.py"), *map(str, folders), *study.sharpness,
               "--launcher", launcher, "--parallel", str(args.parallel), *args.extra]
    if args.dry_run or args.status:
        counts: dict[str, int] = {}
        for folder in folders:
            state = state_of(folder)
            if state == "finished":
                state = "measured" if (folder / "analysis" / "sharpness.json").exists() else "to measure"
            counts[state] = counts.get(state, 0) + 1
            print(f"{state:10s} {folder}")
        print("runs: " + ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
              + " (measured: a sharpness record exists; a rerun reads back what was measured with these options)")
        if args.dry_run:
            print("would run: " + " ".join(command[1:]))
        return 0
    print(f"running: {' '.join(command[1:3])} ... ({len(folders)} run folders) {' '.join(command[2 + len(folders):])}",
          flush=True)
    return subprocess.call(command, cwd=REPO)


def run_sweeps(commands: list[list[str]], parallel: int) -> int:
    """Run the sweeps, ``parallel`` at a time (each with one thread unless OMP_NUM_THREADS is set; their lines
    prefixed with the sweep's number when several run at once); status 0 only if every sweep succeeded."""
    environment = dict(os.environ)
    if parallel > 1:
        environment.setdefault("OMP_NUM_THREADS", "1")
    failed: list[tuple[int, int]] = []
    running: dict[int, tuple[subprocess.Popen, threading.Thread | None]] = {}
    pending = list(enumerate(commands, 1))
    while pending or running:
        while pending and len(running) < parallel:
            number, command = pending.pop(0)
            print(f"running [{number}/{len(commands)}]: " + " ".join(command[1:]), flush=True)
            if parallel == 1:
                running[number] = (subprocess.Popen(command, cwd=REPO, env=environment), None)
                continue
            process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            echo = threading.Thread(target=_echo, args=(process, f"[{number}] "), daemon=True)
            echo.start()
            running[number] = (process, echo)
        ended = [number for number, (process, _) in running.items() if process.poll() is not None]
        if not ended:
            time.sleep(0.2)
        for number in ended:
            process, echo = running.pop(number)
            if echo is not None:
                echo.join()
            if process.returncode != 0:
                failed.append((number, process.returncode))
    if failed:
        listed = ", ".join(f"sweep {number} (status {status})" for number, status in sorted(failed))
        print(f"error: {len(failed)} of {len(commands)} sweeps did not finish every job: {listed}; relaunch the same "
              "command to continue (finished runs are skipped)", file=sys.stderr)
        return 2
    return 0


def _echo(process: subprocess.Popen, prefix: str) -> None:
    """Print a running sweep's lines as they come, each with its prefix (reading keeps its pipe from filling)."""
    for line in process.stdout:
        print(prefix + line, end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
