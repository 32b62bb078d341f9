"""ImageNet-style data in the ImageFolder layout, through timm's standard transforms in worker processes.

``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (also .jpg, .jpeg and .png, any case); classes are
the sorted folder names of ``train``. Too large for the device, so :class:`FolderLoader` decodes and transforms
images in a torch DataLoader, but keeps the device loader's promises: the same batches for the same (seed,
epoch) whatever the number of workers, resumable from any batch, and the caller's random state left alone.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fsam.data import seeding
from fsam.data.loaders import batches_per_epoch, epoch_order, shard_block
from fsam.errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
LAYOUT = "train/<class>/*.JPEG and val/<class>/*.JPEG"


@dataclass
class FolderSplits:
    """Image paths and int64 labels per split; ``classes[label]`` is the folder name of a label."""

    classes: list[str]
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray


def scan_imagefolder(root: str | Path) -> FolderSplits:
    """List the images of ``root/train`` and ``root/val``, sorted by class and file name.

    Raises:
        DataError: ``root`` is a file, a split folder is missing or holds no images (an empty ``val`` would score
            nothing), or ``val`` has a class that ``train`` lacks.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset.root={root} is a file, not a folder: point dataset.root= at a folder holding {LAYOUT}")
    splits = [root / "train", root / "val"]
    if not all(folder.is_dir() for folder in splits):
        raise DataError(
            f"ImageNet not found: {root} must hold {LAYOUT} (the ImageFolder layout); point dataset.root= at "
            f"that folder"
        )
    classes = sorted(entry.name for entry in splits[0].iterdir() if entry.is_dir())
    label_of = {name: label for label, name in enumerate(classes)}
    listed = []
    for folder in splits:
        paths, labels = [], []
        for class_folder in sorted(entry for entry in folder.iterdir() if entry.is_dir()):
            if class_folder.name not in label_of:
                raise DataError(
                    f"{class_folder} is a class that {splits[0]} does not have: the val classes must be train's"
                )
            for path in sorted(class_folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    paths.append(str(path))
                    labels.append(label_of[class_folder.name])
        if not paths:
            raise DataError(
                f"{folder} holds no images: expected {folder.name}/<class>/*.JPEG (or .jpg, .png) as in {LAYOUT}"
            )
        listed.append((paths, np.asarray(labels, dtype=np.int64)))
    (train_paths, train_labels), (test_paths, test_labels) = listed
    return FolderSplits(classes, train_paths, train_labels, test_paths, test_labels)


@dataclass
class _Unreadable:
    """What a batch becomes when one of its images cannot be decoded (raised as DataError in the main process).

    Raising in a worker would reach the caller wrapped in a multi-line message with the worker's traceback.
    """

    message: str


@contextmanager
def _seeded_global_generators(seed: int) -> Iterator[None]:
    """Seed torch's CPU, Python's and numpy's global generators for one transform, then put them back.

    timm's and torchvision's transforms draw from these globals; seeding them per example makes the draws a
    function of (seed, epoch, index), and restoring them keeps them untouched for the caller (in the main
    process when ``num_workers`` is 0).
    """
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class _ImageDataset(Dataset):
    """Decodes and transforms one image per key (index, epoch) -> (float32 [3, S, S], label, problem or "")."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor],
                 seed: int, random_transform: bool) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.seed = seed
        self.random_transform = random_transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, str]:
        index, epoch = key
        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")  # decodes now, inside the try
        except (OSError, Image.DecompressionBombError) as error:  # UnidentifiedImageError and truncation: OSError
            reason = " ".join(str(error).split())
            return None, -1, f"cannot read image {path} ({reason}): replace or delete the file"
        if not self.random_transform:
            return self.transform(image), int(self.labels[index]), ""
        with _seeded_global_generators(seeding.derive_seed(seeding.SAMPLE_TRANSFORM, self.seed, epoch, index)):
            return self.transform(image), int(self.labels[index]), ""


def _collate(samples: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor, torch.Tensor] | _Unreadable:
    """Stack a batch: float32 [B, 3, S, S] and int64 [B]; or the first problem, when an image was unreadable."""
    problems = [problem for _, _, problem in samples if problem]
    if problems:
        return _Unreadable(problems[0])
    images = torch.stack([image for image, _, _ in samples])
    return images, torch.tensor([label for _, label, _ in samples], dtype=torch.int64)


class _EpochBatches:
    """The DataLoader's batch sampler: lists of (index, epoch) keys for the epoch set by :meth:`start`.

    The keys carry the epoch because persistent workers hold their own copy of the dataset: the epoch has to
    travel with each request to seed the example's transform.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, train: bool, rank: int, world_size: int,
                 drop_last: bool = True):
        self.num_examples = num_examples
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self.block = shard_block(num_examples, rank, world_size, train=train)
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        shard = self.block.stop - self.block.start
        return batches_per_epoch(shard, self.batch_size, train=self.train, drop_last=self.drop_last)

    def start(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.train:
            indices = epoch_order(self.num_examples, self.seed, self.epoch)[0][self.block].tolist()
        else:
            indices = list(range(self.block.start, self.block.stop))
        for number in range(self.start_batch, self.batches_per_epoch()):
            chosen = indices[number * self.batch_size : (number + 1) * self.batch_size]
            yield [(index, self.epoch) for index in chosen]


class FolderLoader:
    """Batches of image files through a transform in ``num_workers`` worker processes (0: in this process).

    ``iterate(epoch, start_batch)`` yields (inputs float32 [B, 3, S, S], targets int64 [B]) on ``device``.
    Training: shuffled by (seed, epoch), sharded in equal blocks, last partial batch dropped (unless
    ``drop_last=False``), each example's
    random transform seeded from (seed, epoch, index). Test: in file order, contiguous shards, last batch kept.
    An image that cannot be decoded raises DataError naming its path.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        batch_size: int,
        seed: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        device: torch.device = torch.device("cpu"),
        channels_last: bool = False,
        drop_last: bool = True,
    ) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = _EpochBatches(len(paths), batch_size, seed, train, rank, world_size, drop_last)
        self.loader = DataLoader(
            _ImageDataset(paths, labels, transform, seed, random_transform=train),
            batch_sampler=self.batches,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            # DataLoader draws its workers' base seed from this generator; without one it would draw from
            # torch's global generator and change the caller's random state.
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        """Batches per epoch in this process."""
        return self.batches.batches_per_epoch()

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches ``start_batch``, ..., ``len(self) - 1`` of ``epoch``."""
        self.batches.start(epoch, start_batch)
        for batch in self.loader:
            if isinstance(batch, _Unreadable):
                raise DataError(batch.message)
            inputs, targets = batch
            inputs = inputs.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield inputs, targets.to(self.device, non_blocking=True)


def imagefolder_transforms(image_size: int) -> tuple[Any, Any]:
    """timm's standard ImageNet training and evaluation transforms at ``image_size``: PIL image -> float32 [3, S, S]."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=True), create_transform(image_size, is_training=False)
