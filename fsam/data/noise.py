"""Label noise on the training split, as in the F-SAM release's noisy-label experiments.

A fraction ``ratio`` of the training examples is chosen (``round(ratio * N)`` of them, uniformly) and relabelled:

* ``symmetric``: by a class drawn uniformly from all classes, so about 1/num_classes of the chosen keep their
  label and the share of wrong labels is ``ratio * (1 - 1 / num_classes)``;
* ``asymmetric``: by a class map that confuses similar classes; chosen examples of a class that the map leaves
  alone keep their label. CIFAR-10 (the usual map): truck -> automobile, bird -> airplane, deer -> horse,
  cat <-> dog. CIFAR-100: each class -> the next class of its superclass (cyclic). Digits (the usual MNIST map):
  2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1.

The choice depends only on the labels and ``NoiseSpec.seed``, so every run (and every process of a run) that
uses the same spec gets the same noisy labels. The test split is never corrupted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fsam.data import seeding
from fsam.data.specs import NoiseSpec
from fsam.errors import ConfigError

# CIFAR-10 class indices: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
CIFAR10_CONFUSIONS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# Handwritten digits (the map used for MNIST since Patrini et al., CVPR 2017): 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1.
DIGITS_CONFUSIONS = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def cifar10_class_map() -> torch.Tensor:
    """int64 [10]: the class each CIFAR-10 class is relabelled to by asymmetric noise (itself when none)."""
    return confusion_map(CIFAR10_CONFUSIONS, 10)


def digits_class_map() -> torch.Tensor:
    """int64 [10]: the digit each digit is relabelled to by asymmetric noise (itself when none)."""
    return confusion_map(DIGITS_CONFUSIONS, 10)


def confusion_map(confusions: dict[int, int], num_classes: int) -> torch.Tensor:
    class_map = torch.arange(num_classes)
    for source, target in confusions.items():
        class_map[source] = target
    return class_map


def next_in_superclass(fine_labels: np.ndarray, coarse_labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """int64 [num_classes]: each fine class -> the next fine class (by index, cyclic) of the same superclass.

    The superclass of each fine class is read from the archive's (fine, coarse) label pairs, not assumed to be
    blocks of consecutive classes. A class that does not occur, or is alone in its superclass, maps to itself.
    """
    superclass_of = dict(zip(np.asarray(fine_labels).tolist(), np.asarray(coarse_labels).tolist()))
    members: dict[int, list[int]] = {}
    for fine in sorted(superclass_of):
        members.setdefault(superclass_of[fine], []).append(fine)
    class_map = torch.arange(num_classes)
    for group in members.values():
        for position, fine in enumerate(group):
            class_map[fine] = group[(position + 1) % len(group)]
    return class_map


def corrupt_labels(
    labels: torch.Tensor, num_classes: int, spec: NoiseSpec, class_map: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Relabel a fraction of ``labels`` (int64 [N]) as ``spec`` says; returns the new labels and a record.

    ``class_map``: int64 [num_classes], used by asymmetric noise. The record has ``kind``, ``ratio``, ``seed``,
    ``selected`` (examples chosen) and ``flipped`` (labels that differ from the true ones).

    Raises:
        ConfigError: asymmetric noise without a class map (the data set has none).
    """
    record: dict[str, Any] = {"kind": spec.kind, "ratio": spec.ratio, "seed": spec.seed, "selected": 0, "flipped": 0}
    if spec.kind == "none" or spec.ratio == 0.0:
        return labels.clone(), record
    if spec.kind == "asymmetric" and class_map is None:
        raise ConfigError(
            "dataset.noise.kind=asymmetric needs a class map, and this data set has none: "
            "use dataset.noise.kind=symmetric or none"
        )
    generator = seeding.generator(seeding.LABEL_NOISE, spec.seed)
    count = round(spec.ratio * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    noisy = labels.clone()
    if spec.kind == "symmetric":
        noisy[chosen] = torch.randint(0, num_classes, (count,), generator=generator)
    else:
        noisy[chosen] = class_map[labels[chosen]]
    record["selected"] = count
    record["flipped"] = int((noisy != labels).sum())
    return noisy, record
