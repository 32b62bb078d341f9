"""The typed schema of a run: one dataclass per config group, with the rule each value must satisfy.

The groups mirror ``configs/``: ``model``, ``dataset``, ``optimizer``, ``schedule``, ``logger`` and the
``trainer`` keys of ``configs/train.yaml``. A field's rule (its ``metadata["rule"]``) is checked by
:func:`fsam.config.load_config` after the value's type; the rule's text is what an error message says is allowed.
Units: learning rates are absolute, epochs count passes over the training split, batch sizes count examples per
process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fsam.data import DATASETS, NOISE_KINDS
from fsam.names import BASE_OPTIMIZERS, METHODS, PERTURBATIONS, PRECISION_MODES


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``allows(value)`` decides, ``text`` says it to a person."""

    text: str
    allows: Callable[[Any], bool]


def one_of(*choices: str) -> Rule:
    return Rule(f"use one of {', '.join(choices)}", lambda value: value in choices)


def greater_than(bound: float) -> Rule:
    return Rule(f"must be > {bound:g}", lambda value: value > bound)


def at_least(bound: float) -> Rule:
    return Rule(f"must be >= {bound:g}", lambda value: value >= bound)


def within(low: float, high: float, *, include_high: bool = True) -> Rule:
    closing = "]" if include_high else ")"
    return Rule(
        f"must be in [{low:g}, {high:g}{closing}",
        lambda value: low <= value <= high if include_high else low <= value < high,
    )


def each(rule: Rule) -> Rule:
    return Rule(f"each entry {rule.text}", lambda values: all(rule.allows(value) for value in values))


NOT_EMPTY = Rule("must not be empty: give a folder, or leave it out for runs/<setting>/seed<seed>", lambda v: v != "")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_RULE = Rule("use auto, cpu, cuda or cuda:N", lambda value: DEVICE_PATTERN.fullmatch(value) is not None)
INCREASING_EPOCHS = Rule(
    "must be increasing epoch numbers >= 1",
    lambda values: all(value >= 1 for value in values) and list(values) == sorted(set(values)),
)


def setting(default: Any = None, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with an optional rule; ``factory`` for mutable defaults."""
    metadata = {"rule": rule} if rule else {}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    """``name``: see :func:`fsam.models.available_models` or ``timm:<name>``; ``kwargs`` go to the builder.
    ``pretrained``: timm models only, timm's own weights (downloaded once into timm's cache); ``pretrained_path``:
    a local weights file for any model."""

    name: str = "resnet18"
    pretrained: bool = False
    pretrained_path: Optional[str] = None
    kwargs: dict[str, Any] = setting(factory=dict)


@dataclass(frozen=True)
class NoiseConfig:
    """Label noise on the training split: ``ratio`` of the labels replaced (see :mod:`fsam.data.noise`).

    ``seed`` draws which labels change and to what: a number gives every training seed the same noisy data set
    (the default, 0); null draws them from ``trainer.seed``, so each seed has its own (the authors' release)."""

    kind: str = setting("none", one_of(*NOISE_KINDS))
    ratio: float = setting(0.0, within(0.0, 1.0))
    seed: Optional[int] = setting(0, at_least(0))


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation for CIFAR and digits; ``padding`` and ``cutout_size`` in pixels."""

    crop: bool = True
    padding: int = setting(4, at_least(0))
    flip: bool = True
    cutout: bool = True
    cutout_size: int = setting(16, at_least(0))
    cutout_prob: float = setting(0.5, within(0.0, 1.0))
    normalize: bool = True


@dataclass(frozen=True)
class DatasetConfig:
    """Where the data lives and how it is read; ``train_subset`` keeps the first N training examples.

    ``val_split`` holds N of the (remaining) training examples out as a validation split, chosen by ``val_seed``
    alone, reported beside the test split every epoch: tune on it, not on the test split. ``drop_last`` false
    trains on each epoch's last partial batch too (the authors' release does).
    """

    name: str = setting("cifar100", one_of(*DATASETS))
    root: str = "data"
    download: bool = True
    url: Optional[str] = None
    md5: Optional[str] = None
    image_size: int = setting(32, at_least(1))
    num_workers: int = setting(2, at_least(0))
    train_subset: Optional[int] = setting(None, at_least(1))
    val_split: int = setting(0, at_least(0))
    val_seed: int = setting(0, at_least(0))
    drop_last: bool = True
    noise: NoiseConfig = setting(factory=NoiseConfig)
    augment: AugmentConfig = setting(factory=AugmentConfig)


@dataclass(frozen=True)
class OptimizerConfig:
    """The method and its base optimizer (see :func:`fsam.optim.create_optimizer`).

    ``rho``, ``sigma``, ``lmbda``, ``eta`` and ``ema_order`` are present for every method and used only by the
    methods that have them (``sgd`` ignores all five). ``rho`` null is the method's own radius
    (:data:`fsam.names.METHOD_REGISTRY`: SAM 0.1, F-SAM 0.2, ASAM and F-ASAM 1.0), filled in when the config is
    checked, so every way of choosing a method gives it the same radius.

    ``perturbation`` (``sam`` only; the paper's Figure-1 analysis): ``minibatch`` is SAM; ``full`` perturbs along
    the full-batch gradient, ``noise`` along the minibatch gradient's part orthogonal to it. The full gradient is
    computed exactly over the training set every ``full_grad_every`` steps (read by ``full`` and ``noise`` only):
    one extra pass over the training set, i.e. (N / batch) / ``full_grad_every`` extra forward+backward passes per
    step on average.
    """

    name: str = setting("fsam", one_of(*METHODS))
    base: str = setting("sgd", one_of(*BASE_OPTIMIZERS))
    lr: float = setting(0.05, greater_than(0.0))
    momentum: float = setting(0.9, within(0.0, 1.0, include_high=False))
    nesterov: bool = False
    weight_decay: float = setting(1e-3, at_least(0.0))
    betas: tuple[float, float] = setting((0.9, 0.999), each(within(0.0, 1.0, include_high=False)))
    rho: Optional[float] = setting(None, greater_than(0.0))
    sigma: float = setting(1.0, at_least(0.0))
    lmbda: float = setting(0.6, within(0.0, 1.0, include_high=False))
    eta: float = setting(0.0, at_least(0.0))
    ema_order: str = setting("code", one_of("code", "paper"))
    perturbation: str = setting("minibatch", one_of(*PERTURBATIONS))
    full_grad_every: int = setting(390, at_least(1))
    no_decay_norm_and_bias: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate per iteration: ``cosine`` (to 0 at the last step) or ``multistep``.

    ``milestones`` are epochs (the rate is multiplied by ``gamma`` when each is reached; multistep only).
    ``warmup_epochs`` (may be fractional) ramps linearly from ``warmup_lr`` to the optimizer's ``lr`` first.
    """

    name: str = setting("cosine", one_of("cosine", "multistep"))
    warmup_epochs: float = setting(0.0, at_least(0.0))
    warmup_lr: float = setting(0.0, at_least(0.0))
    milestones: list[int] = setting(factory=list, rule=INCREASING_EPOCHS)
    gamma: float = setting(0.1, within(0.0, 1.0))


@dataclass(frozen=True)
class LoggerConfig:
    """``backend: wandb`` mirrors the run to Weights & Biases; ``mode: auto`` is offline without key or network."""

    backend: str = setting("none", one_of("none", "wandb"))
    project: str = "fsam"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = setting(factory=list)
    name: Optional[str] = None
    mode: str = setting("auto", one_of("auto", "online", "offline"))


@dataclass(frozen=True)
class TrainerConfig:
    """The loop.

    ``amp``: bf16 autocast (no scaler), fp16 with a loss scaler, or off. On the CPU, bf16 runs as off (bf16
    autocast is slower than float32 there), with a one-line note. ``eval_batch_size`` null means
    ``batch_size``. ``checkpoint_every_steps`` 0 checkpoints at epoch ends only. ``log_every`` is in steps (the
    progress bar's loss and wandb's step records). ``sync_clean_pass``: DDP only, see
    :func:`fsam.optim.train_step`. ``full_grad_analysis_every``: F-SAM only, logging only (0: off): every that
    many steps, compute the exact full-batch gradient and record how well the EMA estimates it (cosine and relative
    error, in the epoch's ``analysis`` entry of metrics.jsonl and wandb's ``analysis/``); training is unchanged.
    """

    epochs: int = setting(200, at_least(1))
    batch_size: int = setting(128, at_least(1))
    eval_batch_size: Optional[int] = setting(None, at_least(1))
    micro_batches: int = setting(1, at_least(1))
    device: str = setting("auto", DEVICE_RULE)
    amp: str = setting("bf16", one_of(*PRECISION_MODES))
    channels_last: bool = False
    compile: bool = False
    seed: int = setting(1, at_least(0))
    log_every: int = setting(50, at_least(1))
    checkpoint_every_steps: int = setting(0, at_least(0))
    label_smoothing: float = setting(0.0, within(0.0, 1.0, include_high=False))
    sync_clean_pass: bool = False
    full_grad_analysis_every: int = setting(0, at_least(0))


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. ``run_dir`` is the run folder (records, checkpoints); null means
    ``$FSAM_RUNS/<setting>/seed<seed>`` (:func:`fsam.runfolder.default_run_dir`). ``experiment_name`` is a label
    recorded with the run; it does not change what the run computes or where it lives."""

    run_dir: Optional[str] = setting(None, NOT_EMPTY)
    experiment_name: str = "default"
    model: ModelConfig = setting(factory=ModelConfig)
    dataset: DatasetConfig = setting(factory=DatasetConfig)
    optimizer: OptimizerConfig = setting(factory=OptimizerConfig)
    schedule: ScheduleConfig = setting(factory=ScheduleConfig)
    logger: LoggerConfig = setting(factory=LoggerConfig)
    trainer: TrainerConfig = setting(factory=TrainerConfig)
