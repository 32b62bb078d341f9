"""PyramidNet (Han, Kim & Kim, 2017) for 32x32 inputs: channels grow by alpha / N, one step per block.

Every block widens its input by the same amount (additive widening), so no block doubles channels at a stage
boundary; the shortcut is an average pool where the block strides, then zero channels appended (no projection).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fsam.errors import ConfigError
from fsam.models.weight_init import PooledClassifier, check_init, init_normal_fan_out_convs


def _zero_padded_shortcut(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, out_channels, H/stride, W/stride]: pool to the block's size, pad channels with zeros."""
    if stride != 1:
        x = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)
    return F.pad(x, (0, 0, 0, 0, 0, out_channels - x.shape[1]))


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN: [B, in_channels, H, W] -> [B, channels, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv1(self.bn1(x))))
        out = self.bn3(self.conv2(out))
        return out + _zero_padded_shortcut(x, self.out_channels, self.stride)


class PyramidBottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN.

    [B, in_channels, H, W] -> [B, 4 * channels, H/stride, W/stride].
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, self.out_channels, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv1(self.bn1(x))))
        out = F.relu(self.bn3(self.conv2(out)))
        out = self.bn4(self.conv3(out))
        return out + _zero_padded_shortcut(x, self.out_channels, self.stride)


class PyramidNet(PooledClassifier):
    """PyramidNet-depth with widening factor alpha: images [B, 3, H, W] -> logits [B, num_classes].

    depth = 9N + 2 with bottleneck blocks (6N + 2 with basic blocks), N blocks in each of three stages; block k of
    3N has round(16 + k * alpha / 3N) channels before the bottleneck's 4x expansion. init="release" is the F-SAM
    release's (models/pyramidnet.py): convolutions drawn as ours, but the linear bias keeps PyTorch's uniform default.
    """

    def __init__(
        self, depth: int, alpha: float, num_classes: int, bottleneck: bool = True, init: str = "ours"
    ) -> None:
        check_init(init)
        super().__init__()
        layers_per_block = 3 if bottleneck else 2
        if (depth - 2) % (3 * layers_per_block) != 0 or depth < 2 + 3 * layers_per_block:
            allowed = "9N + 2 (20, 110, 164, 272...)" if bottleneck else "6N + 2 (20, 110, 164, 272...)"
            raise ConfigError(f"model.kwargs.depth={depth} does not fit a PyramidNet with these blocks: use {allowed}")
        if alpha <= 0:
            raise ConfigError(f"model.kwargs.alpha={alpha} must be positive (the total channels added)")
        block = PyramidBottleneck if bottleneck else PyramidBasicBlock
        blocks_per_stage = (depth - 2) // (3 * layers_per_block)
        channels_per_block = alpha / (3 * blocks_per_stage)

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        stages = []
        in_channels = 16
        width = 16.0
        for stage in range(3):
            blocks = []
            for index in range(blocks_per_stage):
                width += channels_per_block
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_channels, round(width), stride))
                in_channels = round(width) * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_channels)
        self._add_head(in_channels, num_classes, init, release_init=init_normal_fan_out_convs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.stem(x))))


def pyramidnet110(
    num_classes: int, depth: int = 110, alpha: float = 270, bottleneck: bool = True, init: str = "ours"
) -> PyramidNet:
    """PyramidNet-110 with alpha = 270 and bottleneck blocks unless depth / alpha / bottleneck say otherwise.

    With the defaults it is the F-SAM release's ``PyramidNet110``: 18,426,837 parameters at 100 classes.
    """
    return PyramidNet(depth, alpha, num_classes, bottleneck, init)
