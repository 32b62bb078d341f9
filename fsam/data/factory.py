"""``build_data``: the one place that turns the dataset settings into loaders and facts about the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fsam.data.specs import DATASETS, AugmentSpec, NoiseSpec
from fsam.errors import ConfigError

# Data sets whose classes have a documented confusion map for asymmetric label noise.
ASYMMETRIC_NOISE_DATASETS = ("cifar10", "cifar100", "digits")
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 32, "imagenet": 224}


@dataclass
class DataBundle:
    """The loaders of one process and what the model and the records need to know about the data.

    ``train``, ``test``: loaders with ``len()`` (batches per epoch in this process) and
    ``iterate(epoch, start_batch=0)`` yielding (float32 [B, 3, image_size, image_size], int64 [B]) on the device.
    ``val``: the held-out part of the training split (``val_split`` examples, read like the test split), or None.
    ``mean``, ``std``: the per-channel normalisation of the [0, 1] pixels. ``info``: plain values for the run's
    records: ``dataset``, ``num_classes``, ``image_size``, ``num_train`` (after ``train_subset`` and ``val_split``),
    ``num_val``, ``num_test``, ``train_per_rank`` and ``label_noise`` (see :func:`fsam.data.noise.corrupt_labels`).
    ``train_in_order``: the training split as the full-batch gradient sees it (:func:`fsam.optim.full_gradient`):
    every example once, in order, without augmentation, with the training labels (noisy ones included), in batches
    of the training batch size, this process's contiguous block of it; None for ImageNet. ``clean_train_in_order``:
    the same with the clean labels, where label noise changed some (None otherwise): how much of the noise a model
    fitted is the difference.
    """

    train: Any
    test: Any
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict[str, Any]
    val: Any = None
    train_in_order: Any = None
    clean_train_in_order: Any = None


_Split = tuple[Any, np.ndarray]  # examples (uint8 images or file paths) and their int64 labels


@dataclass
class _Arrays:
    """A data set read into memory: uint8 images [N, 3, H, W] and int64 labels [N] per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_map: torch.Tensor | None  # for asymmetric label noise


def build_data(
    name: str,
    root: str,
    *,
    batch_size: int,
    eval_batch_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    download: bool = True,
    url: str | None = None,
    md5: str | None = None,
    augment: AugmentSpec = AugmentSpec(),
    noise: NoiseSpec = NoiseSpec(),
    image_size: int | None = None,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    train_subset: int | None = None,
    val_split: int = 0,
    val_seed: int = 0,
    drop_last: bool = True,
) -> DataBundle:
    """Read data set ``name`` from ``root`` and build this process's training and test loaders.

    Args:
        name: one of ``DATASETS``. ``cifar10``/``cifar100``: the python-pickle archives (downloaded into
            ``root`` when missing and ``download``; ``url`` and ``md5`` replace the official ones). ``digits``:
            scikit-learn's bundled digits (``root`` unused). ``imagenet``: ``root/train/<class>/*.JPEG`` and
            ``root/val/<class>/*.JPEG`` through timm's transforms (``augment`` unused).
        batch_size: training examples per batch and process; ``eval_batch_size`` (default ``batch_size``) for
            the test split.
        device: where batches are delivered; CIFAR and digits live there entirely.
        seed: the order and augmentation of each epoch are a function of (seed, epoch).
        image_size: side of the delivered images in pixels (default: 32, or 224 for ImageNet); CIFAR and
            digits batches are resized on the device (bilinear) when it is not 32.
        num_workers: decoding processes of the ImageFolder loader (the device-resident loaders need none).
        rank, world_size: this process's place; each gets its own shard of both splits.
        channels_last: deliver inputs in channels-last memory format.
        train_subset: keep only the first ``train_subset`` training examples (before label noise).
        val_split: hold this many of those examples out of training as a validation split, chosen by
            ``val_seed`` alone (the same images for every training seed and method), with their own labels:
            label noise is applied to the examples that remain. Choose hyperparameters and epochs on it, not on
            the test split.
        drop_last: False trains on each epoch's last partial batch too (the authors' release) instead of
            dropping it.

    Raises:
        ConfigError: an unknown data set or a setting that does not fit it (batch larger than the shard,
            asymmetric noise without a class map).
        DataError: the data is missing, incomplete or corrupt (see :mod:`fsam.data.cifar`).
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset.name={name!r} is not a data set: choose one of {', '.join(DATASETS)}")
    _check_positive("trainer.batch_size", batch_size)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    _check_positive("trainer.eval_batch_size", eval_batch_size)
    image_size = DEFAULT_IMAGE_SIZE[name] if image_size is None else image_size
    _check_positive("dataset.image_size", image_size)
    if train_subset is not None:
        _check_positive("dataset.train_subset", train_subset)
    if isinstance(val_split, bool) or not isinstance(val_split, int) or val_split < 0:
        raise ConfigError(f"dataset.val_split={val_split!r} is not allowed: must be a whole number >= 0")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is not allowed with world_size={world_size}: must be in [0, {world_size})")
    if noise.kind == "asymmetric" and name not in ASYMMETRIC_NOISE_DATASETS:
        raise ConfigError(
            f"dataset.noise.kind=asymmetric has no class map for {name}: it exists for "
            f"{', '.join(ASYMMETRIC_NOISE_DATASETS)}; use dataset.noise.kind=symmetric or none"
        )
    device = torch.device(device)
    if name == "imagenet":
        return _build_imagefolder(
            root, batch_size=batch_size, eval_batch_size=eval_batch_size, device=device, seed=seed, noise=noise,
            image_size=image_size, num_workers=num_workers, rank=rank, world_size=world_size,
            channels_last=channels_last, train_subset=train_subset, val_split=val_split, val_seed=val_seed,
            drop_last=drop_last,
        )
    arrays = _read_arrays(name, root, download=download, url=url, md5=md5, rank=rank, world_size=world_size)
    train_images, train_labels = _subset(arrays.train_images, arrays.train_labels, train_subset)
    (train_images, train_labels), held_out = _hold_out(train_images, train_labels, val_split, val_seed)
    _check_batch_fits(batch_size, len(train_labels), world_size, drop_last)
    from fsam.data.noise import corrupt_labels

    noisy_labels, noise_record = corrupt_labels(
        torch.from_numpy(train_labels), arrays.num_classes, noise, arrays.class_map
    )
    from fsam.data.loaders import DeviceLoader

    def loader(images: torch.Tensor, labels: torch.Tensor, train: bool, batch: int) -> DeviceLoader:
        return DeviceLoader(
            images, labels.to(device), batch_size=batch, augment_spec=augment, mean=arrays.mean, std=arrays.std,
            seed=seed, train=train, rank=rank, world_size=world_size, image_size=image_size,
            channels_last=channels_last, drop_last=drop_last,
        )

    train_on_device = torch.from_numpy(train_images).to(device)  # one copy on the device for both training views
    train = loader(train_on_device, noisy_labels, train=True, batch=batch_size)
    train_in_order = loader(train_on_device, noisy_labels, train=False, batch=batch_size)
    clean_train_in_order = None
    if noise.kind != "none":
        clean_train_in_order = loader(train_on_device, torch.from_numpy(train_labels), train=False, batch=batch_size)
    test = loader(torch.from_numpy(arrays.test_images).to(device), torch.from_numpy(arrays.test_labels), train=False,
                  batch=eval_batch_size)
    val = None
    if val_split:
        val = loader(torch.from_numpy(held_out[0]).to(device), torch.from_numpy(held_out[1]), train=False,
                     batch=eval_batch_size)
    info = _info(name, arrays.num_classes, image_size, len(train_labels), len(arrays.test_labels), world_size,
                 noise_record, val_split)
    return DataBundle(train, test, arrays.num_classes, image_size, arrays.mean, arrays.std, info, val, train_in_order,
                      clean_train_in_order)


def _read_arrays(
    name: str, root: str, *, download: bool, url: str | None, md5: str | None, rank: int, world_size: int
) -> _Arrays:
    if name == "digits":
        from fsam.data.digits import NUM_CLASSES, load_digits
        from fsam.data.noise import digits_class_map

        digits = load_digits()
        return _Arrays(
            digits.train_images, digits.train_labels, digits.test_images, digits.test_labels, NUM_CLASSES,
            mean=(digits.mean,) * 3, std=(digits.std,) * 3, class_map=digits_class_map(),
        )
    from fsam.data.cifar import CIFAR_MEAN, CIFAR_STD, VARIANTS, load_cifar
    from fsam.data.noise import cifar10_class_map, next_in_superclass

    splits = load_cifar(name, root, download=download, url=url, md5=md5, rank=rank, world_size=world_size)
    num_classes = VARIANTS[name].num_classes
    if splits.train_coarse is None:
        class_map = cifar10_class_map()
    else:
        class_map = next_in_superclass(splits.train_labels, splits.train_coarse, num_classes)
    return _Arrays(
        splits.train_images, splits.train_labels, splits.test_images, splits.test_labels, num_classes,
        mean=CIFAR_MEAN, std=CIFAR_STD, class_map=class_map,
    )


def _build_imagefolder(
    root: str,
    *,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    seed: int,
    noise: NoiseSpec,
    image_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    channels_last: bool,
    train_subset: int | None,
    val_split: int,
    val_seed: int,
    drop_last: bool,
) -> DataBundle:
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from fsam.data.imagefolder import FolderLoader, imagefolder_transforms, scan_imagefolder
    from fsam.data.noise import corrupt_labels

    splits = scan_imagefolder(root)
    train_paths, train_labels = _subset(splits.train_paths, splits.train_labels, train_subset)
    (train_paths, train_labels), held_out = _hold_out(train_paths, train_labels, val_split, val_seed)
    _check_batch_fits(batch_size, len(train_labels), world_size, drop_last)
    num_classes = len(splits.classes)
    noisy_labels, noise_record = corrupt_labels(torch.from_numpy(train_labels), num_classes, noise, None)
    train_transform, test_transform = imagefolder_transforms(image_size)
    common = dict(seed=seed, rank=rank, world_size=world_size, num_workers=num_workers, device=device,
                  channels_last=channels_last)
    train = FolderLoader(train_paths, noisy_labels.numpy(), train_transform, batch_size=batch_size, train=True,
                         drop_last=drop_last, **common)
    test = FolderLoader(splits.test_paths, splits.test_labels, test_transform, batch_size=eval_batch_size,
                        train=False, **common)
    val = None
    if val_split:
        val = FolderLoader(held_out[0], held_out[1], test_transform, batch_size=eval_batch_size, train=False,
                           **common)
    info = _info("imagenet", num_classes, image_size, len(train_labels), len(splits.test_labels), world_size,
                 noise_record, val_split)
    return DataBundle(train, test, num_classes, image_size, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD),
                      info, val)


def _check_positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} is not allowed: must be a whole number >= 1")


def _subset(examples: Any, labels: np.ndarray, train_subset: int | None) -> tuple[Any, np.ndarray]:
    """The first ``train_subset`` examples and labels (all when None)."""
    if train_subset is None:
        return examples, labels
    if train_subset > len(labels):
        raise ConfigError(
            f"dataset.train_subset={train_subset} is larger than the {len(labels)} training examples: "
            f"lower it, or use null for all of them"
        )
    return examples[:train_subset], labels[:train_subset]


def _hold_out(examples: Any, labels: np.ndarray, val_split: int, val_seed: int) -> tuple[_Split, _Split]:
    """(training examples, labels) without the validation split, and (validation examples, labels).

    The ``val_split`` held-out positions are the first of a permutation drawn from ``val_seed`` alone; both parts
    keep the data set's order."""
    if not val_split:
        return (examples, labels), (examples[:0], labels[:0])
    if val_split >= len(labels):
        raise ConfigError(
            f"dataset.val_split={val_split} leaves no training examples (there are {len(labels)}): hold out fewer"
        )
    from fsam.data import seeding

    order = torch.randperm(len(labels), generator=seeding.generator(seeding.VALIDATION_SPLIT, val_seed)).numpy()
    held = np.zeros(len(labels), dtype=bool)
    held[order[:val_split]] = True
    kept, val = np.flatnonzero(~held), np.flatnonzero(held)
    return (_take(examples, kept), labels[kept]), (_take(examples, val), labels[val])


def _take(examples: Any, positions: np.ndarray) -> Any:
    """``examples[positions]`` for an array, or the listed items of a sequence (ImageFolder paths)."""
    if isinstance(examples, np.ndarray):
        return examples[positions]
    return [examples[position] for position in positions]


def _check_batch_fits(batch_size: int, num_train: int, world_size: int, drop_last: bool = True) -> None:
    per_rank = num_train // world_size
    if batch_size > per_rank:
        raise ConfigError(
            f"trainer.batch_size={batch_size} is larger than the {per_rank} training examples of each process "
            f"({num_train} over {world_size} process{'es' if world_size > 1 else ''}): lower trainer.batch_size"
        )
    if not drop_last and per_rank % batch_size == 1:
        raise ConfigError(
            f"dataset.drop_last=false leaves a last batch of 1 example ({per_rank} per process, batch "
            f"{batch_size}), which BatchNorm cannot train on: use dataset.drop_last=true or another batch size"
        )


def _info(name: str, num_classes: int, image_size: int, num_train: int, num_test: int, world_size: int,
          noise_record: dict[str, Any], num_val: int = 0) -> dict[str, Any]:
    return {
        "dataset": name,
        "num_classes": num_classes,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "train_per_rank": num_train // world_size,
        "label_noise": noise_record,
    }
