"""A multilayer perceptron on the flattened image: the network small enough for a study on 2 CPU cores.

On scikit-learn's digits at their native 8x8 (``dataset.image_size=8``) a 2-layer MLP of width 512 with BatchNorm
fits even heavily noisy training labels within a few hundred epochs of a few seconds each, which is the regime in
which the SAM family's robustness to label noise can show (docs/protocol_digits_noise.md). BatchNorm keeps the
measurement conditions of the convolutional networks (eval mode, running statistics) meaningful here too.
"""

from __future__ import annotations

import torch
from torch import nn

from fsam.errors import ConfigError
from fsam.models.weight_init import check_init


class MLP(nn.Module):
    """Images [B, C, S, S] -> flattened [B, C·S·S] -> ``depth`` blocks of linear -> BatchNorm -> ReLU (each
    ``width`` wide) -> linear -> logits [B, num_classes].

    ``init``: "ours" and "release" both keep PyTorch's default for linear layers (kaiming-uniform, bounded by
    1 / sqrt(fan_in)), which is what "ours" does for every linear layer of the convolutional networks; the F-SAM
    release has no MLP. BatchNorm starts at weight 1 and bias 0.
    """

    def __init__(self, num_classes: int, image_size: int = 32, in_channels: int = 3, width: int = 512, depth: int = 2,
                 batch_norm: bool = True, init: str = "ours") -> None:
        check_init(init)
        for key, value, least in (("width", width, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"model.kwargs.{key}={value!r} is not allowed: mlp takes a whole number >= {least}")
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * image_size * image_size
        for _ in range(depth):
            layers.append(nn.Linear(features, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            features = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(features, num_classes)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (the head that fine-tuning replaces)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def mlp(num_classes: int = 10, image_size: int = 32, width: int = 512, depth: int = 2, batch_norm: bool = True,
        init: str = "ours") -> MLP:
    """An :class:`MLP` for 3-channel square images of side ``image_size`` (the data set's, passed by the factory)."""
    return MLP(num_classes, image_size=image_size, width=width, depth=depth, batch_norm=batch_norm, init=init)
