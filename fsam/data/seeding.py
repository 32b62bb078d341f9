"""Seeds derived from several integers, so that each (seed, epoch, ...) gets its own independent random stream.

Every random choice of the data code draws from a generator built here, never from torch's or Python's global
generators: batches then depend only on the numbers that name them, not on what else the caller drew.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream names: the same (seed, epoch) gives unrelated numbers for different uses.
EPOCH_ORDER = 1
LABEL_NOISE = 2
SAMPLE_TRANSFORM = 3
VALIDATION_SPLIT = 4
MEASUREMENT_IMAGES = 5  # the training images a sharpness measurement is taken on (fsam.analysis.record)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that mixes all of ``parts`` (non-negative integers) through numpy's SeedSequence."""
    low, high = np.random.SeedSequence([int(part) for part in parts]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) >> 1


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts``; CPU so that the same numbers come out whatever the device."""
    return torch.Generator().manual_seed(derive_seed(*parts))
