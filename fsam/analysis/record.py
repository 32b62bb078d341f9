"""The sharpness record of a run folder, ``<run>/analysis/sharpness.json``: the run's weights and training images
loaded as the run left them, the measurements of :mod:`fsam.analysis` asked for, and every number written with
the conditions it was measured under.

    from fsam.analysis.record import Options, measure_run
    outcome = measure_run("runs/digits-pyramidnet8-fsam-d9923828717e/seed1", Options(what=("eigen", "rho")))
    outcome.measured, outcome.read_back, outcome.record["measurements"]["eigen"]["result"]["eigenvalues"]

**Conditions, fixed and recorded with every number.** The weights of the checkpoint asked for: ``final``
(``checkpoints/final.pt``; a run finished before that file existed is measured on the model of its
``checkpoints/last.pt``, which a finished run last wrote at its final epoch, and the record says so) or ``best``
(the model of ``checkpoints/best.pt``, the epoch of the best test top-1: chosen on the test set). The images:
``images`` examples of the training split as the run trained on it (after ``dataset.train_subset`` and
``dataset.val_split``), chosen by ``image_seed`` alone (the same images for every run of a data set), without
augmentation, normalised as at test time, with the labels the run trained on (``labels="trained"``: noisy ones
included) or the true ones (``"clean"``); their positions and the number of wrong labels among them are recorded.
The network in eval mode (BatchNorm with its running statistics, no dropout), in float32. The loss: the run's
cross-entropy (with its label smoothing), mean over the images, without weight decay.

**One record per quantity.** ``measurements`` holds one entry per quantity (``eigen``, ``trace``, ``rho``,
``slice1d``, ``slice2d``, ``line``): its ``options`` (exactly what its numbers depend on), ``conditions``,
``result``, ``seconds`` and ``measured_at``. Measuring a quantity again with equal options reads it back; other
options measure it again and replace it (:attr:`Outcome.changed` says which options changed); quantities not
asked for are kept as they are. The file is replaced whole (:func:`fsam.runfolder.write_json_atomic`); nothing
else in the run folder is written.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from fsam.analysis.hessian import hessian_trace, top_eigenvalues
from fsam.analysis.landscape import filter_normalised_directions, loss_along_line, loss_slice
from fsam.analysis.measurement import mean_loss, trainable_parameters
from fsam.analysis.perturbation import rho_sharpness
from fsam.config import RunConfig, load_config, to_plain
from fsam.errors import FsamError
from fsam.runfolder import RunFolder, differences, git_commit, now_iso, read_json, write_json_atomic

FORMAT = 1
QUANTITIES = ("eigen", "trace", "rho", "slice1d", "slice2d", "line")
CHECKPOINTS = ("final", "best")
LABELS = ("trained", "clean")
# What every quantity's numbers depend on, then each quantity's own options.
COMMON_OPTIONS = ("checkpoint", "images", "image_seed", "labels", "batch_size")
QUANTITY_OPTIONS = {
    "eigen": ("seed", "top_k", "power_iterations", "power_tolerance"),
    "trace": ("seed", "trace_probes"),
    "rho": ("seed", "rho", "adaptive_rho", "ascent_steps", "random_directions"),
    "slice1d": ("seed", "slice_radius", "slice_points"),
    "slice2d": ("seed", "slice_radius", "slice2d_points"),
    "line": ("line_to", "line_points"),
}
MODEL_MODE = ("eval: BatchNorm normalises with its running statistics, which the measurement never changes; "
              "dropout off")
AUGMENTATION = "none: the stored training images, normalised as at test time"


class RefusedRun(FsamError):
    """A run folder that cannot be measured (damaged, unfinished, without the checkpoint asked for)."""


@dataclass(frozen=True)
class Options:
    """What to measure and how; every field is a command-line option of ``scripts/sharpness.py``.

    ``what``: quantities of :data:`QUANTITIES`. ``checkpoint``: ``final`` or ``best``. ``images``: training
    images measured on, chosen by ``image_seed``; ``labels``: ``trained`` or ``clean``; ``batch_size``: examples per
    forward pass, and m of ρ-sharpness (``images`` must then be a multiple of it). ``seed``: every random
    direction, probe and starting vector. ``eigen``: ``top_k`` eigenvalues, each at most ``power_iterations``
    Hessian-vector products, stopping at a relative change below ``power_tolerance``. ``trace``:
    ``trace_probes`` Rademacher probes. ``rho``: the radii ``rho`` (plain L2 ball) and ``adaptive_rho`` (scaled by
    |w|), each with ``random_directions`` random directions and ``ascent_steps`` ascent steps per batch.
    ``slice1d``/``slice2d``: ``slice_points`` (per side ``slice2d_points``) steps from −``slice_radius`` to
    +``slice_radius`` along filter-normalised directions. ``line``: ``line_points`` points from this run's weights
    (t = 0) to those of the run folder ``line_to`` (t = 1).
    """

    what: tuple[str, ...] = ("eigen", "trace", "rho")
    checkpoint: str = "final"
    images: int = 128
    image_seed: int = 0
    labels: str = "trained"
    batch_size: int = 64
    seed: int = 0
    top_k: int = 1
    power_iterations: int = 20
    power_tolerance: float = 1e-3
    trace_probes: int = 10
    rho: tuple[float, ...] = (0.1,)
    adaptive_rho: tuple[float, ...] = (1.0,)
    ascent_steps: int = 10
    random_directions: int = 10
    slice_radius: float = 1.0
    slice_points: int = 21
    slice2d_points: int = 11
    line_to: str | None = None
    line_points: int = 11

    def __post_init__(self) -> None:
        unknown = [name for name in self.what if name not in QUANTITIES]
        if unknown or not self.what:
            raise FsamError(f"--what {','.join(self.what)} is not allowed: name one or more of {','.join(QUANTITIES)}")
        for name, allowed in (("checkpoint", CHECKPOINTS), ("labels", LABELS)):
            if getattr(self, name) not in allowed:
                raise FsamError(f"--{name.replace('_', '-')} {getattr(self, name)} is not allowed: use "
                                f"{' or '.join(allowed)}")
        at_least = {"images": 1, "batch_size": 1, "top_k": 1, "power_iterations": 1, "trace_probes": 2,
                    "ascent_steps": 0, "random_directions": 1, "slice_points": 2, "slice2d_points": 2,
                    "line_points": 2, "image_seed": 0, "seed": 0}
        for name, lowest in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise FsamError(f"--{name.replace('_', '-')} {value} is not allowed: give a whole number >= {lowest}")
        positive = {"power_tolerance": [self.power_tolerance], "slice_radius": [self.slice_radius],
                    "rho": list(self.rho), "adaptive_rho": list(self.adaptive_rho)}
        for name, values in positive.items():
            if any(not value > 0 for value in values):
                raise FsamError(f"--{name.replace('_', '-')} {' '.join(map(str, values))} is not allowed: each "
                                "must be > 0")
        if "rho" in self.what and not (self.rho or self.adaptive_rho):
            raise FsamError("--what rho needs a radius: give --rho or --adaptive-rho (or both)")
        if "rho" in self.what and self.images % self.batch_size:
            raise FsamError(f"--images {self.images} is not a multiple of --batch-size {self.batch_size}: "
                            "ρ-sharpness averages batches of one size m, so give a multiple")
        if "line" in self.what and not self.line_to:
            raise FsamError("--what line needs the other end: give --line-to OTHER_RUN (a finished run folder)")

    def of(self, quantity: str, other_run: str | None = None) -> dict[str, Any]:
        """The options ``quantity``'s numbers depend on, as JSON values; ``line_to`` as ``other_run`` (the other
        run's setting and seed, so that moving the runs elsewhere does not count as a change)."""
        chosen = {name: getattr(self, name) for name in (*COMMON_OPTIONS, *QUANTITY_OPTIONS[quantity])}
        if quantity == "line":
            chosen["line_to"] = other_run
        return to_plain(chosen)


@dataclass
class Outcome:
    """What :func:`measure_run` did: the quantities ``measured`` and ``read_back``, for each one measured again
    the options that ``changed`` (``key: old -> new``), and the whole ``record`` as written (or read)."""

    run_dir: Path
    measured: list[str] = field(default_factory=list)
    read_back: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def measure_run(run_dir: str | Path, options: Options, *, device: str | torch.device = "cpu",
                progress: bool = True) -> Outcome:
    """Measure the quantities of ``options.what`` on the run in ``run_dir`` (reading back those already measured
    with equal options) and write ``analysis/sharpness.json`` there. ``progress``: a progress bar (tqdm, on
    stderr) over the measurement's steps.

    Raises:
        RefusedRun: the folder's records do not verify, the run has not finished, or the checkpoint asked for
            (or the other end of the line) cannot be used.
        FsamError: the data set cannot be read, or is ImageNet (not measurable here yet).
    """
    folder = finished_run(run_dir)
    config = load_config(folder.read_config()[0])
    outcome = Outcome(folder.path)
    path = folder.sharpness
    existing = read_json(path) or {}
    if (existing.get("format"), existing.get("run")) != (FORMAT, run_name(folder)):
        existing = {}  # unreadable, of another format, or copied from another run: nothing in it is this run's
    measurements = dict(existing.get("measurements") or {})
    other = other_config = None
    if "line" in options.what:
        with refused_as_the_other_end(options.line_to):
            other = finished_run(options.line_to)
        other_config = load_config(other.read_config()[0])
        if (other_config.dataset.name, other_config.model) != (config.dataset.name, config.model):
            raise RefusedRun(f"the line needs two runs of one data set and network: {other.path} trains "
                             f"{other_config.model.name} on {other_config.dataset.name}, this run "
                             f"{config.model.name} on {config.dataset.name}")
    other_name = run_name(other) if other is not None else None
    wanted = {quantity: options.of(quantity, other_name) for quantity in options.what}
    to_measure = []
    for quantity in options.what:
        old = measurements.get(quantity)
        if old is not None and old.get("options") == wanted[quantity]:
            outcome.read_back.append(quantity)
            continue
        if old is not None:
            outcome.changed[quantity] = differences(old.get("options") or {}, wanted[quantity])
        to_measure.append(quantity)
    if not to_measure:
        outcome.record = existing
        return outcome

    device = torch.device(device)
    measured = MeasuredRun(folder, config, options, device)
    other_weights = None
    if other is not None:
        with refused_as_the_other_end(options.line_to):
            other_weights, other_source = load_weights(other, options.checkpoint, other_config.trainer.epochs,
                                                       device)
    plan = {quantity: planned_steps(quantity, options, len(measured.batches)) for quantity in to_measure}
    with tqdm(total=sum(plan.values()), unit="step", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for quantity in to_measure:
            bar.set_description(f"{folder.path.parent.name}/{folder.path.name} {quantity}")
            started, done = time.perf_counter(), bar.n
            result = measured.measure(quantity, bar.update, other_weights)
            bar.update(plan[quantity] - (bar.n - done))  # power iteration may stop early
            if quantity == "line":
                result["to"] = {"run_dir": str(other.path), "run": other_name, "weights": other_source}
            measurements[quantity] = {
                "options": wanted[quantity], "conditions": measured.conditions, "result": result,
                "seconds": time.perf_counter() - started, "measured_at": now_iso(),
            }
            outcome.measured.append(quantity)
    # Read again just before writing: a measurement of other quantities that finished meanwhile is kept.
    latest = read_json(path) or {}
    latest = dict(latest.get("measurements") or {}) if latest.get("run") == run_name(folder) else {}
    latest.update({quantity: measurements[quantity] for quantity in to_measure})
    outcome.record = {"format": FORMAT, "run": run_name(folder), "measurements": latest}
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, outcome.record)
    return outcome


@contextmanager
def refused_as_the_other_end(run_dir: str | Path) -> Iterator[None]:
    """A refusal of the line's other run, said of that run (the script names the run measured before it)."""
    try:
        yield
    except RefusedRun as refusal:
        raise RefusedRun(f"the other end of the line, {run_dir}: {refusal}") from None


def finished_run(run_dir: str | Path) -> RunFolder:
    """The run folder at ``run_dir`` if its records verify and it has finished; RefusedRun saying why not."""
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise RefusedRun("not a folder: give a run folder (one with config.yaml), or a folder of them")
    problem = folder.problem()
    if problem is not None:
        raise RefusedRun(f"damaged ({problem})")
    state = folder.state()
    if state != "finished":
        raise RefusedRun(f"not finished ({state}): only a finished run has the weights to measure")
    return folder


def run_name(folder: RunFolder) -> str:
    """``<setting>/seed<N>``: which run a record or a line end belongs to, wherever its folder lies."""
    _, identity = folder.read_config()
    return f"{identity['setting']}/seed{identity['seed']}"


def load_weights(folder: RunFolder, checkpoint: str, epochs: int, device: torch.device
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model state of a finished run's ``final`` or ``best`` checkpoint on ``device``, and where it came from:
    ``file`` (relative to the run folder), ``epoch`` and, for a run from before ``final.pt``, a ``note``."""
    checkpoints = folder.checkpoints
    if checkpoint == "final" and (checkpoints / "final.pt").exists():
        return _read(checkpoints / "final.pt", device, whole=False), {"file": "checkpoints/final.pt", "epoch": epochs}
    name = "best.pt" if checkpoint == "best" else "last.pt"
    state = _read(checkpoints / name, device, whole=True)
    source = {"file": f"checkpoints/{name}", "epoch": state.get("epoch")}
    if checkpoint == "best":
        source["test_top1"] = state.get("best_top1")
        source["note"] = "the epoch of the best test top-1: chosen on the test set"
        return state["model"], source
    if state.get("epoch") != epochs:
        raise RefusedRun(f"has no final weights: no checkpoints/final.pt, and checkpoints/last.pt holds epoch "
                         f"{state.get('epoch')} of {epochs}")
    source["note"] = ("the run finished before checkpoints/final.pt was written: its last checkpoint, written at "
                      "the final epoch, holds the final weights")
    return state["model"], source


def _read(path: Path, device: torch.device, *, whole: bool) -> Any:
    if not path.exists():
        raise RefusedRun(f"has no {path.parent.name}/{path.name}: measure another checkpoint (--checkpoint)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a torn or foreign file shows up as any of several exception types
        raise RefusedRun(f"{path.parent.name}/{path.name} cannot be read ({type(error).__name__})") from None
    if not isinstance(state, dict) or (whole and "model" not in state):
        raise RefusedRun(f"{path.parent.name}/{path.name} is not a checkpoint of this engine")
    return state


def planned_steps(quantity: str, options: Options, batches: int) -> int:
    """The progress bar's steps of ``quantity``: Hessian-vector products, probes, batches of ρ-sharpness (per
    radius), points of a slice or of the line."""
    return {
        "eigen": options.top_k * options.power_iterations,
        "trace": options.trace_probes,
        "rho": (len(options.rho) + len(options.adaptive_rho)) * batches,
        "slice1d": options.slice_points,
        "slice2d": options.slice2d_points ** 2,
        "line": options.line_points,
    }[quantity]


def evenly(low: float, high: float, points: int) -> list[float]:
    """``points`` values from ``low`` to ``high``, the ends exact (and 0 exact in a symmetric odd grid)."""
    return [low + (high - low) * index / (points - 1) for index in range(points)]


class MeasuredRun:
    """One run ready to measure: its network with the chosen weights, the chosen images in batches, the loss and
    the conditions recorded with every number."""

    def __init__(self, folder: RunFolder, config: RunConfig, options: Options, device: torch.device) -> None:
        from fsam.data import AugmentSpec, seeding
        from fsam.data.loaders import DeviceLoader
        from fsam.engine.loop import run_data, run_model

        self.options = options
        data = run_data(config, device)
        if data.train_in_order is None:
            raise FsamError(f"{config.dataset.name} runs cannot be measured yet: their images are read from files "
                            "in worker processes; sharpness.py measures CIFAR and digits runs")
        stored = data.train_in_order
        available = len(stored.labels)
        if options.images > available:
            raise FsamError(f"--images {options.images} is more than the {available} training images this run "
                            "trained on: give fewer")
        order = torch.randperm(available, generator=seeding.generator(seeding.MEASUREMENT_IMAGES, options.image_seed))
        positions = order[:options.images].sort().values
        chosen = positions.to(stored.labels.device)
        trained = stored.labels[chosen]
        noisy = config.dataset.noise.kind != "none" and config.dataset.noise.ratio > 0
        true = run_data(config, device, label_noise=False).train_in_order.labels[chosen] if noisy else trained
        labels = trained if options.labels == "trained" else true
        loader = DeviceLoader(
            stored.images[chosen], labels, batch_size=options.batch_size,
            augment_spec=AugmentSpec(**to_plain(config.dataset.augment)), mean=data.mean, std=data.std, seed=0,
            train=False, image_size=data.image_size, channels_last=config.trainer.channels_last,
        )
        self.batches = list(loader.iterate(0))
        weights, source = load_weights(folder, options.checkpoint, config.trainer.epochs, device)
        self.model = run_model(config, data, device, pretrained_weights=False)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:
            raise RefusedRun(f"{source['file']} does not fit the network of config.yaml "
                             f"({str(error).splitlines()[0]})") from None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.trainer.label_smoothing)
        noise = to_plain(config.dataset.noise)
        self.conditions = {
            "checkpoint": options.checkpoint, "weights": source,
            "images": options.images, "training_images": available, "image_seed": options.image_seed,
            "image_positions": positions.tolist() if options.images < available else "all",
            "labels": options.labels, "label_noise": {**noise, "seed": trainer_noise_seed(config)} if noisy else None,
            "wrong_labels": int((labels != true).sum()), "augmentation": AUGMENTATION,
            "batch_size": options.batch_size, "model_mode": MODEL_MODE,
            "loss": (f"cross-entropy, mean over the images, label smoothing {config.trainer.label_smoothing:g}; "
                     "weight decay left out"),
            "loss_at_weights": mean_loss(self.model.eval(), self.loss_fn, self.batches),
            "precision": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in trainable_parameters(self.model)),
            "device": str(device), "torch": torch.__version__, "fsam_commit": git_commit(),
        }

    def measure(self, quantity: str, advance: Callable[[int], Any],
                other_weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """``quantity``'s result as plain JSON values; ``advance`` moves the progress bar."""
        options, model, loss_fn, batches = self.options, self.model, self.loss_fn, self.batches
        if quantity == "eigen":
            top = top_eigenvalues(model, loss_fn, batches, k=options.top_k, iterations=options.power_iterations,
                                  tolerance=options.power_tolerance, seed=options.seed, progress=advance)
            return {"eigenvalues": top.values, "iterations": top.iterations,
                    "relative_changes": top.relative_changes, "converged": top.converged,
                    "hessian_vector_products": top.hessian_vector_products}
        if quantity == "trace":
            trace = hessian_trace(model, loss_fn, batches, probes=options.trace_probes, seed=options.seed,
                                  progress=advance)
            return {"trace": trace.value, "standard_error": trace.standard_error, "probes": trace.probes,
                    "samples": trace.samples, "hessian_vector_products": trace.probes}
        if quantity == "rho":
            return {geometry: [dataclasses.asdict(rho_sharpness(
                        model, loss_fn, batches, rho, adaptive=geometry == "adaptive",
                        ascent_steps=options.ascent_steps, random_directions=options.random_directions,
                        seed=options.seed, progress=advance)) for rho in radii]
                    for geometry, radii in (("plain", options.rho), ("adaptive", options.adaptive_rho))}
        if quantity in ("slice1d", "slice2d"):
            dimensions = 1 if quantity == "slice1d" else 2
            points = options.slice_points if dimensions == 1 else options.slice2d_points
            grid = evenly(-options.slice_radius, options.slice_radius, points)
            directions = filter_normalised_directions(model, dimensions, seed=options.seed)
            cut = loss_slice(model, loss_fn, batches, directions, grid, grid if dimensions == 2 else None,
                             progress=advance)
            return {"alphas": cut.alphas, **({"betas": cut.betas} if cut.betas else {}), "losses": cut.losses,
                    "directions": f"filter-normalised (Li et al. 2018), seed {options.seed}"}
        line = loss_along_line(model, loss_fn, batches, other_weights, evenly(0.0, 1.0, options.line_points),
                               progress=advance)
        return {"ts": line.alphas, "losses": line.losses,
                "batchnorm": "running mean and variance interpolated with the weights, not recomputed"}


def trainer_noise_seed(config: RunConfig) -> int:
    """The seed the run's label noise was drawn with (the training seed where the config leaves it open)."""
    return config.dataset.noise.seed if config.dataset.noise.seed is not None else config.trainer.seed
