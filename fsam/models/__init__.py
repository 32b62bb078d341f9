"""Classifiers by name: CIFAR ResNets, Wide ResNets, PyramidNet, VGG written here, and any timm model.

    from fsam.models import create_model
    model = create_model("resnet18", num_classes=100)                      # CIFAR stem, 32x32 inputs
    model = create_model("timm:convnext_tiny", num_classes=1000, image_size=224)
    model = create_model("deit_small", 100, image_size=224, pretrained_path="deit_small.pth")  # new head
    check_forward(model, image_size=224)   # options that only fail in forward become a ConfigError now
"""

from fsam.models.factory import (
    CIFAR_MODELS,
    TIMM_ALIASES,
    TIMM_PREFIX,
    available_models,
    check_forward,
    create_model,
)
from fsam.models.pretrained import load_pretrained

__all__ = [
    "CIFAR_MODELS",
    "TIMM_ALIASES",
    "TIMM_PREFIX",
    "available_models",
    "check_forward",
    "create_model",
    "load_pretrained",
]
