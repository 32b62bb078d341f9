"""What a run asks of its data: the data set names, the augmentation recipe and the label noise.

Plain dataclasses without torch, so that the config schema can import them on every command-line call. Each one
checks its values when built and names the config key of a bad value.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsam.errors import ConfigError

DATASETS = ("cifar10", "cifar100", "digits", "imagenet")
NOISE_KINDS = ("none", "symmetric", "asymmetric")


def _refuse(key: str, value: object, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_flag(key: str, value: object) -> None:
    if not isinstance(value, bool):
        _refuse(key, value, "must be true or false")


def _check_count(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _refuse(key, value, "must be a whole number >= 0")


def _check_fraction(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        _refuse(key, value, "must be in [0, 1]")


@dataclass(frozen=True)
class AugmentSpec:
    """The CIFAR recipe, done on the device in batch by :func:`fsam.data.augment.augment`.

    ``crop``: a window of the image zero-padded by ``padding`` pixels on each side (torchvision's RandomCrop with
    padding). ``flip``: horizontal mirror with probability 1/2. ``cutout``: with probability ``cutout_prob``, a
    ``cutout_size`` x ``cutout_size`` square (clipped at the border) set to zero after normalisation.
    ``normalize``: subtract the data set's mean and divide by its std, per channel; the test split gets only
    this step. The ImageFolder reader uses timm's transforms instead and ignores these switches.
    """

    crop: bool = True
    padding: int = 4
    flip: bool = True
    cutout: bool = True
    cutout_size: int = 16
    cutout_prob: float = 0.5
    normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("crop", "flip", "cutout", "normalize"):
            _check_flag(f"dataset.augment.{name}", getattr(self, name))
        _check_count("dataset.augment.padding", self.padding)
        _check_count("dataset.augment.cutout_size", self.cutout_size)
        _check_fraction("dataset.augment.cutout_prob", self.cutout_prob)


@dataclass(frozen=True)
class NoiseSpec:
    """Label noise on the training split (see :mod:`fsam.data.noise`): ``ratio`` of the labels replaced.

    ``symmetric``: by a class drawn uniformly from all classes (the true one included). ``asymmetric``: by the
    data set's class map (CIFAR only). ``seed`` chooses the examples and the new labels, apart from the
    training seed, so that runs with different seeds can share one noisy data set.
    """

    kind: str = "none"
    ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            _refuse("dataset.noise.kind", self.kind, f"use one of {', '.join(NOISE_KINDS)}")
        _check_fraction("dataset.noise.ratio", self.ratio)
        _check_count("dataset.noise.seed", self.seed)
