"""VGG-16 with BatchNorm for 32x32 inputs: thirteen 3x3 convolutions, five max-pools, one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from fsam.models.weight_init import PooledClassifier, check_init, init_normal_fan_out_convs

# Output channels of each 3x3 convolution; "M" is a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(PooledClassifier):
    """Images [B, 3, H, W] -> logits [B, num_classes]; at H = W = 32 the features end at 1x1 before the classifier.

    Args:
        layout: output channels of each 3x3 convolution (each followed by BatchNorm and ReLU), "M" for a max-pool.
        num_classes: width of the last linear layer.
        init: "ours", or "release" for the F-SAM release's (models/vgg.py): convolutions drawn as ours with zero
            biases, every linear layer at PyTorch's default, biases included.
    """

    def __init__(
        self,
        layout: tuple[int | str, ...],
        num_classes: int,
        init: str = "ours",
    ) -> None:
        check_init(init)
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                # No conv bias: the BatchNorm right after it has its own.
                conv = nn.Conv2d(in_channels, item, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self._add_head(in_channels, num_classes, init, release_init=init_normal_fan_out_convs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def vgg16_bn(num_classes: int, init: str = "ours") -> VGG:
    """VGG-16-BN with one linear classifier and no convolution biases: 14,770,212 parameters at 100 classes."""
    return VGG(VGG16_LAYOUT, num_classes, init)

