"""Which examples each process reads, and the device-resident loader of CIFAR and digits.

Sharding (shared with :class:`fsam.data.imagefolder.FolderLoader`):

* training: every process draws the same permutation of all N examples from (seed, epoch) and takes its own
  block of ``N // world_size`` of them, so the shards are disjoint and equal (a process never waits for another
  at the end of an epoch); each process then drops its last partial batch, or with ``drop_last=False`` trains on
  it as a smaller step (the authors' release: 391 steps of a CIFAR epoch at batch 128 rather than 390).
* test: contiguous blocks that together cover the whole split (sizes differ by at most one); the last partial
  batch is kept, so every test example is counted exactly once.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import torch
from torch.nn import functional as F

from fsam.data import seeding
from fsam.data.augment import augment, draw_augmentation
from fsam.data.specs import AugmentSpec


def batches_per_epoch(shard_size: int, batch_size: int, *, train: bool, drop_last: bool = True) -> int:
    """Batches of a shard: training drops the last partial batch when ``drop_last``; evaluation never does."""
    if train and drop_last:
        return shard_size // batch_size
    return math.ceil(shard_size / batch_size)


def shard_block(num_examples: int, rank: int, world_size: int, *, train: bool) -> slice:
    """This process's block of positions: of the epoch's permutation when ``train``, else of the test split.

    Training: ``num_examples // world_size`` positions each (the remainder is left out of the epoch). Test: a
    contiguous cover of the split, the first ``num_examples % world_size`` processes taking one more.
    """
    if train:
        per_rank = num_examples // world_size
        return slice(rank * per_rank, (rank + 1) * per_rank)
    base, extra = divmod(num_examples, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's permutation (int64 [N], the same in every process) and the generator it was drawn from."""
    generator = seeding.generator(seeding.EPOCH_ORDER, seed, epoch)
    return torch.randperm(num_examples, generator=generator), generator


class DeviceLoader:
    """Batches of a split held on the device as one uint8 tensor, augmented there in batch.

    ``iterate(epoch, start_batch)`` yields (inputs float32 [B, 3, S, S], targets int64 [B]) on the device, where S
    is ``image_size``. Training batches are shuffled and augmented with numbers drawn from (seed, epoch) only, so
    the same epoch gives bit-identical batches whatever the caller's random state, and starting at
    ``start_batch`` gives exactly the rest of the epoch (resume after a checkpoint inside an epoch).

    Why on the device: the whole CIFAR training split is 150 MB of uint8, and per-image PIL transforms in worker
    processes can take longer than a small network's step on a GPU; a batched gather there does not.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        augment_spec: AugmentSpec,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        image_size: int | None = None,
        channels_last: bool = False,
        drop_last: bool = True,
    ) -> None:
        """``images``: uint8 [N, 3, H, W] and ``labels``: int64 [N], both already on the device.

        ``train``: shuffle, shard in equal blocks, augment as ``augment_spec`` and drop the last partial batch
        (``drop_last``; False trains on it as a smaller batch); otherwise keep the order, take a contiguous block and only normalise (when ``augment_spec.normalize``).
        ``image_size``: resize each batch (bilinear, after augmentation) when it differs from H.
        """
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.train = train
        self.spec = augment_spec if train else replace(augment_spec, crop=False, flip=False, cutout=False)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.seed = seed
        self.image_size = image_size or images.shape[-1]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.block = shard_block(len(images), rank, world_size, train=train)
        self.shard_size = self.block.stop - self.block.start
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Batches per epoch in this process."""
        return batches_per_epoch(self.shard_size, self.batch_size, train=self.train, drop_last=self.drop_last)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches ``start_batch``, ..., ``len(self) - 1`` of ``epoch`` (see the class docstring)."""
        num_examples, _, height, width = self.images.shape
        if self.train:
            order, generator = epoch_order(num_examples, self.seed, epoch)
            # Drawn for the whole permutation before taking this process's block: an example's augmentation
            # depends on its place in the epoch, not on how many processes share the epoch.
            draws = draw_augmentation(self.spec, num_examples, height, width, generator)
            indices, draws = order[self.block], draws[:, self.block]
        else:
            indices = torch.arange(self.block.start, self.block.stop)
            draws = torch.zeros(6, self.shard_size, dtype=torch.int64)
        device = self.images.device
        indices, draws = indices.to(device), draws.to(device)
        for number in range(start_batch, len(self)):
            batch = slice(number * self.batch_size, (number + 1) * self.batch_size)
            chosen = indices[batch]
            inputs = augment(self.images[chosen], draws[:, batch], self.spec, self.mean, self.std)
            if self.image_size != inputs.shape[-1]:
                inputs = F.interpolate(inputs, size=(self.image_size, self.image_size), mode="bilinear",
                                       align_corners=False)
            yield inputs.contiguous(memory_format=self.memory_format), self.labels[chosen]
