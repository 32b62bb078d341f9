"""ResNet-18/34/50 for 32x32 inputs: a 3x3 stem without max-pool, four stages of 64, 128, 256, 512 channels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fsam.models.weight_init import PooledClassifier, check_init, init_pytorch_default


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """1x1 convolution + BN where the block changes shape, the identity elsewhere."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions: [B, in_channels, H, W] -> [B, channels, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _projection(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand: [B, in_channels, H, W] -> [B, 4 * channels, H/stride, W/stride]."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(PooledClassifier):
    """CIFAR ResNet: images [B, 3, H, W] -> logits [B, num_classes].

    Built for H = W = 32 (the last stage sees 4x4); global average pooling makes any size from 8 up work.
    init="release" keeps PyTorch's default initialisation, as the F-SAM release's ResNet (models/resnet.py) does:
    it re-initialises nothing after construction.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: tuple[int, ...],
        num_classes: int,
        init: str = "ours",
    ) -> None:
        check_init(init)
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages = []
        in_channels = 64
        for stage, num_blocks in enumerate(blocks_per_stage):
            channels = 64 * 2**stage
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_channels, channels, stride))
                in_channels = channels * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self._add_head(in_channels, num_classes, init, release_init=init_pytorch_default)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def resnet18(num_classes: int, init: str = "ours") -> ResNet:
    """ResNet-18, the F-SAM release's network too: 11,220,132 parameters at 100 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, init)


def resnet34(num_classes: int, init: str = "ours") -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, init)


def resnet50(num_classes: int, init: str = "ours") -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, init)
