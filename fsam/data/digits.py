"""scikit-learn's bundled handwritten digits as a small CIFAR-shaped data set: no download, trains in a minute.

The 1,797 images of 8x8 pixels (values 0..16) become uint8 images [3, 32, 32]: scaled to 0..255, each pixel
repeated as a 4x4 block (nearest-neighbour, so no new grey levels) and copied into the three channels. The split
is fixed, stratified, 1,437 training and 360 test images whatever the run's seed, so runs compare on one test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_SIZE = 360
SPLIT_SEED = 0  # fixed on purpose: the split is part of the data set, not of the run
_MAX_VALUE = 16  # the 8x8 images count pen strokes in 4x4 blocks of a 32x32 bitmap: 0..16


@dataclass
class DigitsSplits:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] per split; ``mean``/``std`` of the training pixels in [0, 1]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: float
    std: float


def load_digits() -> DigitsSplits:
    """Load, upsample and split the digits; statistics from the training split (the same for every channel)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    pixels = np.rint(digits.images * (255.0 / _MAX_VALUE)).astype(np.uint8)  # [N, 8, 8]
    scale = IMAGE_SIZE // pixels.shape[1]
    upsampled = pixels.repeat(scale, axis=1).repeat(scale, axis=2)  # [N, 32, 32]
    images = np.ascontiguousarray(np.broadcast_to(upsampled[:, None], (len(upsampled), 3, IMAGE_SIZE, IMAGE_SIZE)))
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    train_pixels = images[train, 0].astype(np.float64) / 255.0
    return DigitsSplits(
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        mean=float(train_pixels.mean()),
        std=float(train_pixels.std()),
    )
