"""What every CIFAR model here shares: the pooled linear head and the initialisations it may start from.

Each model takes ``init``: "ours" (:func:`init_ours`, the same for every family) or "release", what the F-SAM
authors' code (github.com/nblt/F-SAM, ``models/*.py``) does for that family. The release differs from family to
family, so each model passes its own release initialisation to :meth:`PooledClassifier._add_head`.
"""

import math
from typing import Any, Callable

import torch
from torch import nn

from fsam.errors import ConfigError

INITS = ("ours", "release")


def check_init(init: Any) -> None:
    """ConfigError unless ``init`` is one of :data:`INITS`; called before anything is built."""
    if not isinstance(init, str) or init not in INITS:
        raise ConfigError(
            f"model.kwargs.init={init!r} is not an initialisation: choose ours (kaiming-normal fan-out "
            f"convolutions, this project's default) or release (what the F-SAM authors' code does for this network)"
        )


def init_ours(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out, ReLU gain), BatchNorm weight 1 and bias 0, zero linear biases.

    Linear weights keep PyTorch's default (uniform, scaled by fan-in).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def init_pytorch_default(model: nn.Module) -> None:
    """Keep what construction drew: PyTorch's kaiming-uniform (a = sqrt(5)) weights and uniform biases, both
    bounded by 1 / sqrt(fan_in), and BatchNorm weight 1 and bias 0. A 3x3 convolution with as many inputs as
    outputs starts with a weight std sqrt(6) = 2.45 times smaller than under :func:`init_ours`."""


def init_normal_fan_out_convs(model: nn.Module) -> None:
    """Convolution weights normal with std sqrt(2 / (kernel height * kernel width * out_channels)) and zero
    biases, BatchNorm weight 1 and bias 0; linear layers keep PyTorch's default, biases included.

    The convolutions are drawn as in :func:`init_ours`; the difference is the linear biases, left uniform here.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kernel_height, kernel_width = module.kernel_size
            fan_out = kernel_height * kernel_width * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def init_fan_in_convs_zero_linear(model: nn.Module) -> None:
    """Kaiming-normal convolutions with fan-in (ReLU gain) and zero biases, BatchNorm weight 1 and bias 0, every
    linear layer all zero: the network starts predicting the uniform distribution over classes."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class PooledClassifier(nn.Module):
    """Features [B, C, H, W] -> global average pool -> linear head [B, num_classes].

    A subclass checks ``init`` with :func:`check_init` first, builds its layers, defines ``forward_features`` and
    ends its ``__init__`` with ``self._add_head(C, num_classes, init, release_init)``, which also initialises
    every weight.
    """

    def _add_head(
        self, in_channels: int, num_classes: int, init: str, release_init: Callable[[nn.Module], None]
    ) -> None:
        """Add the pool and the head, then initialise the whole model: :func:`init_ours` for init="ours",
        ``release_init`` (the F-SAM release's initialisation of this family) for init="release"."""
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        (init_ours if init == "ours" else release_init)(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The final linear layer (the head that fine-tuning replaces)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))
