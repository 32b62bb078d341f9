"""VGG-16 with BatchNorm for 32x32 inputs: thirteen 3x3 convolutions, five max-pools, then the classifier.

``vgg16_bn`` has one linear classifier; ``vgg16_bn_release`` is the F-SAM release's network, with convolution
biases and a three-layer classifier.
"""

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
        conv_bias: give each convolution a bias; the BatchNorm right after it makes it redundant.
        hidden_layers: blocks of dropout(0.5) -> linear C -> C -> ReLU between the pooled features [B, C] and the
            last linear layer.
    """

    def __init__(
        self,
        layout: tuple[int | str, ...],
        num_classes: int,
        init: str = "ours",
        conv_bias: bool = False,
        hidden_layers: int = 0,
    ) -> None:
        check_init(init)
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                conv = nn.Conv2d(in_channels, item, 3, padding=1, bias=conv_bias)
                layers += [conv, nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        hidden: list[nn.Module] = []
        for _ in range(hidden_layers):
            hidden += [nn.Dropout(0.5), nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True)]
        self.hidden = nn.Sequential(*hidden)
        self._add_head(in_channels, num_classes, init, release_init=init_normal_fan_out_convs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(torch.flatten(self.pool(self.forward_features(x)), 1)))


def vgg16_bn(num_classes: int, init: str = "ours") -> VGG:
    """VGG-16-BN with one linear classifier and no convolution biases: 14,770,212 parameters at 100 classes."""
    return VGG(VGG16_LAYOUT, num_classes, init)


def vgg16_bn_release(num_classes: int, init: str = "release") -> VGG:
    """The F-SAM release's ``VGG16BN``: 15,299,748 parameters at 100 classes (``vgg16_bn``: 14,770,212).

    The same thirteen convolutions with biases, and the classifier dropout(0.5) -> linear 512 -> 512 -> ReLU ->
    dropout(0.5) -> linear 512 -> 512 -> ReLU -> linear 512 -> num_classes. Starts from the release's
    initialisation unless init="ours".
    """
    return VGG(VGG16_LAYOUT, num_classes, init, conv_bias=True, hidden_layers=2)
