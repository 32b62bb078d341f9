"""A comparison of methods fixed before it is run: equal tuning on a validation split, seeds at each method's
choice, and paired differences over seeds (docs/protocol_digits_noise.md states the digits one).

A :class:`Study` is data, not code: its conditions (data sets, label noise), each method's search space, the
number of trials per method (the same for every method), the seeds, the value that chooses a trial and the F-SAM
ablation it ends with. From it come the cells of three stages, each an ordinary grid of ``train.py`` runs
(``scripts/reproduce.py --grid <study>_tune``, ``_seeds``, ``_heatmap``):

1. **tune**: for every condition and method, the same number of trials, drawn once from the method's search space
   by a scrambled Sobol sequence of a fixed seed (so the trials are a stated list, the same on every machine);
2. **seeds**: each method's trial with the highest ``select`` value (a validation number, never a test one) at
   seeds 1..N; the tuning trial is seed 1, so it is one of them;
3. **heatmap**: F-SAM's λ × σ around its choice in one condition, on the validation split, over a few seeds;
4. **sharpness**: the seed stage's final weights measured by ``scripts/sharpness.py`` (here, or as jobs).

:func:`paired_difference` gives the per-seed difference of two methods (the seeds share the data order, the
initialisation and the noisy labels) with a t confidence interval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fsam.errors import FsamError


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter of a search: the config key and its range, searched on a log scale or a linear one."""

    key: str
    low: float
    high: float
    log: bool = True

    def value(self, unit: float) -> float:
        """The value at ``unit`` in [0, 1), to 3 significant digits (a value a person can type and read)."""
        if self.log:
            raw = self.low * (self.high / self.low) ** unit
        else:
            raw = self.low + (self.high - self.low) * unit
        return float(f"{raw:.3g}")


@dataclass(frozen=True)
class Study:
    """What a comparison runs and how it chooses (see the module's docstring)."""

    name: str
    base: tuple[str, ...]  # the recipe's overrides, e.g. ("experiment=digits_noise",)
    conditions: dict[str, tuple[str, ...]]  # name -> the overrides of that data set and label noise
    search: dict[str, tuple[Dimension, ...]]  # method -> its search space
    trials: int  # per method and condition: the same for every method
    trial_seed: int  # of the Sobol sequences
    seeds: int  # of the seed stage: seeds 1..N
    select: str  # the summary value a trial is chosen by (validation, never test)
    heatmap_condition: str
    heatmap: dict[str, tuple[float, ...]] = field(default_factory=dict)  # F-SAM key -> values
    heatmap_seeds: int = 3
    # scripts/sharpness.py's options for the seed stage's runs (the analysis stage, ``<study>_sharpness``)
    sharpness: tuple[str, ...] = ("--images", "512", "--what", "eigen,trace,rho,slice1d")

    def trial_overrides(self, method: str) -> list[list[str]]:
        """The method's trials, each as overrides: a scrambled Sobol sequence of ``trial_seed`` mapped onto its
        search space (the same list on every machine and every run of this code)."""
        from scipy.stats import qmc

        dimensions = self.search[method]
        points = qmc.Sobol(len(dimensions), scramble=True, seed=self.trial_seed).random(self.trials)
        return [[f"{dimension.key}={dimension.value(unit)}" for dimension, unit in zip(dimensions, point)]
                for point in points]

    def method_cell(self, condition: str, method: str) -> list[str]:
        return [*self.base, *self.conditions[condition], f"optimizer={method}"]

    def tuning_cells(self) -> list[tuple[str, str, list[str]]]:
        """(condition, method, overrides) of every tuning trial (the launcher adds the seed: 1)."""
        return [(condition, method, [*self.method_cell(condition, method), *trial])
                for condition in self.conditions for method in self.search
                for trial in self.trial_overrides(method)]


@dataclass
class Choice:
    """A method's chosen trial in one condition: its overrides (without the seed), the value it was chosen by,
    and the run folder of its tuning run."""

    condition: str
    method: str
    overrides: list[str]
    value: float
    folder: Path


ComposeRuns = Callable[[list[list[str]]], list[tuple[Path, dict[str, Any]]]]


def choices(study: Study, compose_runs: ComposeRuns) -> dict[tuple[str, str], Choice]:
    """Each (condition, method)'s trial with the highest ``study.select`` (the first of equal ones), read from the
    tuning runs' summaries. FsamError when a tuning run has not finished (or its records do not verify)."""
    from fsam.runfolder import RunFolder

    cells = study.tuning_cells()
    folders = compose_runs([[*overrides, "trainer.seed=1"] for _, _, overrides in cells])
    best: dict[tuple[str, str], Choice] = {}
    missing = []
    for (condition, method, overrides), (folder, _) in zip(cells, folders):
        run = RunFolder(folder)
        summary = run.finished_summary() if run.problem() is None else None
        if summary is None or summary.get(study.select) is None:
            missing.append(folder)
            continue
        value = float(summary[study.select])
        key = (condition, method)
        if key not in best or value > best[key].value:
            best[key] = Choice(condition, method, overrides, value, folder)
    if missing:
        raise FsamError(
            f"{len(missing)} of {len(cells)} tuning runs of {study.name} are not finished (e.g. {missing[0]}): run "
            f"python scripts/reproduce.py --grid {study.name}_tune --seeds 1 first; it continues where it stopped"
        )
    return best


def seed_blocks(study: Study, compose_runs: ComposeRuns) -> list[list[str]]:
    """The seed stage: each method's chosen trial in every condition (the seeds are added by the launcher)."""
    chosen = choices(study, compose_runs)
    return [chosen[(condition, method)].overrides for condition in study.conditions for method in study.search]


def heatmap_cells(study: Study, compose_runs: ComposeRuns) -> list[list[str]]:
    """The heatmap's settings one by one (λ, then σ), without the seed."""
    kept = _heatmap_base(study, compose_runs)
    return [[*kept, *(f"{key}={value:g}" for key, value in zip(study.heatmap, values))]
            for values in itertools.product(*study.heatmap.values())]


def heatmap_blocks(study: Study, compose_runs: ComposeRuns) -> list[list[str]]:
    """F-SAM's λ × σ in the heatmap condition, every other value at F-SAM's choice there: one sweep per value of
    the first key (so that several can run at once), the other keys swept in each."""
    kept = _heatmap_base(study, compose_runs)
    (first, firsts), *rest = study.heatmap.items()
    return [[*kept, f"{first}={value:g}", *(f"{key}={','.join(f'{item:g}' for item in values)}" for key, values in rest)]
            for value in firsts]


def _heatmap_base(study: Study, compose_runs: ComposeRuns) -> list[str]:
    """F-SAM's choice in the heatmap condition without the keys the heatmap sweeps."""
    chosen = choices(study, compose_runs)[(study.heatmap_condition, "fsam")]
    return [item for item in chosen.overrides if item.split("=", 1)[0] not in study.heatmap]


@dataclass(frozen=True)
class Difference:
    """``mean`` of the per-seed differences a − b over ``n`` paired seeds and its 95 % t interval [low, high]
    (nan for fewer than 2 seeds); ``no_difference`` when the interval contains 0."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def no_difference(self) -> bool:
        return not (self.low > 0 or self.high < 0)

    def text(self, unit: str = "") -> str:
        if self.n < 2:
            return f"{self.mean:+.2f}{unit} (n={self.n}, no interval)"
        verdict = "no difference" if self.no_difference else ("higher" if self.mean > 0 else "lower")
        return f"{self.mean:+.2f}{unit} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n}): {verdict}"


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> Difference:
    """The per-seed differences a[seed] − b[seed] over the seeds both have: mean and its t interval (sample
    standard deviation, n − 1 degrees of freedom)."""
    from scipy.stats import t

    seeds = sorted(set(a) & set(b))
    differences = [a[seed] - b[seed] for seed in seeds]
    n = len(differences)
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, 0)
    mean = sum(differences) / n
    if n < 2:
        return Difference(mean, math.nan, math.nan, n)
    spread = math.sqrt(sum((value - mean) ** 2 for value in differences) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * spread / math.sqrt(n)
    return Difference(mean, mean - half, mean + half, n)


_LR = Dimension("optimizer.lr", 0.01, 0.3)
_WEIGHT_DECAY = Dimension("optimizer.weight_decay", 1e-5, 1e-2)
_RHO = Dimension("optimizer.rho", 0.02, 2.0)

# Clean labels, 20/40/60 % symmetric and 40 % asymmetric label noise: the conditions of both noise studies.
NOISE_CONDITIONS = {
    "clean": ("dataset.noise.kind=none",),
    "sym20": ("dataset.noise.kind=symmetric", "dataset.noise.ratio=0.2"),
    "sym40": ("dataset.noise.kind=symmetric", "dataset.noise.ratio=0.4"),
    "sym60": ("dataset.noise.kind=symmetric", "dataset.noise.ratio=0.6"),
    "asym40": ("dataset.noise.kind=asymmetric", "dataset.noise.ratio=0.4"),
}

# docs/protocol_digits_noise.md: written down, and committed, before any of its runs.
DIGITS_NOISE = Study(
    name="digits_noise",
    base=("experiment=digits_noise",),
    conditions=NOISE_CONDITIONS,
    search={
        "sgd": (_LR, _WEIGHT_DECAY),
        "sam": (_LR, _WEIGHT_DECAY, _RHO),
        "fsam": (_LR, _WEIGHT_DECAY, _RHO, Dimension("optimizer.lmbda", 0.0, 0.95, log=False),
                 Dimension("optimizer.sigma", 0.5, 2.0, log=False)),
    },
    trials=16,
    trial_seed=2026,
    seeds=5,
    select="final_val_top1",
    heatmap_condition="sym40",
    heatmap={"optimizer.lmbda": (0.0, 0.3, 0.6, 0.9, 0.95), "optimizer.sigma": (0.5, 1.0, 1.5, 2.0)},
    heatmap_seeds=3,
)
# The same protocol at the paper's scale, for a GPU cluster (scripts/reproduce.py --grid cifar10_noise_tune
# --launcher slurm): CIFAR-10 and ResNet-18 with the release's recipe (200 epochs, batch 128, Cutout), 5,000
# training images held out for validation, F-SAM's EMA measured once per epoch (352 steps with the last batch).
CIFAR10_NOISE = Study(
    name="cifar10_noise",
    base=("experiment=base/cifar10_resnet18", "dataset.val_split=5000", "trainer.full_grad_analysis_every=352"),
    conditions=NOISE_CONDITIONS,
    search=DIGITS_NOISE.search,
    trials=16,
    trial_seed=2026,
    seeds=5,
    select="final_val_top1",
    heatmap_condition="sym40",
    heatmap=DIGITS_NOISE.heatmap,
    heatmap_seeds=3,
)
STUDIES = {study.name: study for study in (DIGITS_NOISE, CIFAR10_NOISE)}


def seeds_of(values: Sequence[tuple[int, float]]) -> dict[int, float]:
    """{seed: value} from (seed, value) pairs (a seed given twice is a mistake in the records)."""
    paired: dict[int, float] = {}
    for seed, value in values:
        if seed in paired:
            raise FsamError(f"seed {seed} appears twice among the runs of one setting: the records are inconsistent")
        paired[seed] = value
    return paired
