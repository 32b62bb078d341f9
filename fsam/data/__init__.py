"""Data for the experiments: readers, label noise, augmentation and reproducible loaders.

    from fsam.data import build_data
    data = build_data("cifar100", "data/cifar100", batch_size=128, device="cuda", seed=1)
    for inputs, targets in data.train.iterate(epoch):   # float32 [B, 3, 32, 32] and int64 [B] on the device
        ...

CIFAR and digits live on the device as one uint8 tensor and are augmented there in batch
(:class:`~fsam.data.loaders.DeviceLoader`); ImageFolder data goes through timm's transforms in worker processes
(:class:`~fsam.data.imagefolder.FolderLoader`). Both give the same batches for the same seed and epoch, and
resume exactly from any batch.

This module imports neither torch nor the readers: the config schema imports it on every command-line call.
``build_data`` and ``DataBundle`` are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fsam.data.specs import DATASETS, NOISE_KINDS, AugmentSpec, NoiseSpec

if TYPE_CHECKING:
    from fsam.data.factory import DataBundle, build_data

__all__ = ["DATASETS", "NOISE_KINDS", "AugmentSpec", "DataBundle", "NoiseSpec", "build_data"]

_LAZY = {"build_data", "DataBundle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fsam.data import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'fsam.data' has no attribute {name!r}")
