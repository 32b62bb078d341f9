"""What every CIFAR model here shares: one initialisation and the pooled linear head."""

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
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


class PooledClassifier(nn.Module):
    """Features [B, C, H, W] -> global average pool -> linear head [B, num_classes].

    A subclass builds its layers, defines ``forward_features`` and ends its ``__init__`` with
    ``self._add_head(C, num_classes)``, which also initialises every weight.
    """

    def _add_head(self, in_channels: int, num_classes: int) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The final linear layer (the head that fine-tuning replaces)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))
