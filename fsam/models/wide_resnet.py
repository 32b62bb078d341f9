"""Wide ResNets (Zagoruyko & Komodakis, 2016) for 32x32 inputs: pre-activation blocks, widths 16k, 32k, 64k."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fsam.errors import ConfigError
from fsam.models.weight_init import PooledClassifier, check_init, init_fan_in_convs_zero_linear


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3: [B, in_channels, H, W] -> [B, out_channels, H/stride, W/stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # A projection reads the pre-activated input, as in the paper; the identity carries the raw input.
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(PooledClassifier):
    """WRN-depth-widen_factor: images [B, 3, H, W] -> logits [B, num_classes].

    depth = 6n + 4 with n blocks per stage; drop_rate is the dropout probability between a block's convolutions.
    init="release" is the F-SAM release's (models/wide_resnet.py): kaiming-normal fan-in convolutions and an
    all-zero linear head.
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0, init: str = "ours"
    ) -> None:
        check_init(init)
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(
                f"model.kwargs.depth={depth} does not fit a Wide ResNet: use 6n + 4 (10, 16, 22, 28, 40...)"
            )
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"model.kwargs.drop_rate={drop_rate} is not a probability in [0, 1)")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages = []
        in_channels = 16
        for stage, width in enumerate(widths):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(WideBlock(in_channels, width, stride, drop_rate))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_channels)
        self._add_head(in_channels, num_classes, init, release_init=init_fan_in_convs_zero_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.stem(x))))


def wrn28_10(num_classes: int, drop_rate: float = 0.0, init: str = "ours") -> WideResNet:
    """WRN-28-10: 4 blocks per stage, 36,536,884 parameters at 100 classes."""
    return WideResNet(28, 10, num_classes, drop_rate, init)


def wrn16_8(num_classes: int, drop_rate: float = 0.0, init: str = "ours") -> WideResNet:
    """WRN-16-8: 2 blocks per stage, 11,007,540 parameters at 100 classes."""
    return WideResNet(16, 8, num_classes, drop_rate, init)


# The F-SAM release's Wide ResNets build, in each stage, a downsampling block (pre-activation shared with its 1x1
# projection, as here) and then (depth - 4) / 6 more blocks: one block per stage more than the depth in their
# names says. Block for block they are ours, so they are built here as the WRN depth they really have.


def wrn28_10_release(num_classes: int, drop_rate: float = 0.0, init: str = "release") -> WideResNet:
    """The F-SAM release's ``WideResNet28x10``, which is a WRN-34-10: 46,218,164 parameters at 100 classes.

    5 blocks per stage where WRN-28-10 (``wrn28_10``, 36,536,884) has 4: 34 convolutions (the stem, 30 in blocks,
    three 1x1 projections). Starts from the release's initialisation unless init="ours".
    """
    return WideResNet(34, 10, num_classes, drop_rate, init)


def wrn16_8_release(num_classes: int, drop_rate: float = 0.0, init: str = "release") -> WideResNet:
    """The F-SAM release's ``WideResNet16x8``, which is a WRN-22-8: 17,204,276 parameters at 100 classes.

    3 blocks per stage where WRN-16-8 (``wrn16_8``, 11,007,540) has 2. Starts from the release's initialisation
    unless init="ours".
    """
    return WideResNet(22, 8, num_classes, drop_rate, init)
