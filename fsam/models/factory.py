"""Every model by name: the one place a model config becomes an ``nn.Module``."""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, NamedTuple

from torch import nn

from fsam.errors import ConfigError
from fsam.models.pretrained import load_pretrained
from fsam.models.pyramidnet import pyramidnet110
from fsam.models.resnet import resnet18, resnet34, resnet50
from fsam.models.vgg import vgg16_bn
from fsam.models.wide_resnet import wrn16_8, wrn28_10
from fsam.names import TIMM_PREFIX


# Models written here for 32x32 inputs; each builder takes num_classes and its own keyword arguments.
CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "wrn28_10": wrn28_10,
    "wrn16_8": wrn16_8,
    "pyramidnet110": pyramidnet110,
    "vgg16_bn": vgg16_bn,
}


class TimmAlias(NamedTuple):
    """A short name for a timm architecture and the keyword arguments it gets unless the config overrides them."""

    timm_name: str
    defaults: dict[str, Any]
    takes_image_size: bool  # vision transformers size their position embedding from img_size


TIMM_ALIASES: dict[str, TimmAlias] = {
    # ViT-S width and depth (384 wide, 12 blocks, 6 heads) on 4x4 patches: 64 tokens + CLS at 32 px, 21.3M params.
    "vit_cifar": TimmAlias("vit_small_patch16_224", {"patch_size": 4}, takes_image_size=True),
    "vit_small": TimmAlias("vit_small_patch16_224", {}, takes_image_size=True),
    "deit_small": TimmAlias("deit_small_patch16_224", {}, takes_image_size=True),
    "resnet50_imagenet": TimmAlias("resnet50", {}, takes_image_size=False),
}


def available_models() -> list[str]:
    """Sorted names that :func:`create_model` accepts; besides these, "timm:<name>" builds any timm model."""
    return sorted([*CIFAR_MODELS, *TIMM_ALIASES])


def create_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 32,
    pretrained_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier for images [B, 3, image_size, image_size] -> logits [B, num_classes].

    Args:
        name: one of :func:`available_models`, or "timm:<name>" for any timm architecture.
        num_classes: size of the classifier head (at least 1).
        image_size: input height and width in pixels. The ViT aliases build their position embedding for it;
            the CIFAR models and timm CNNs pool globally and accept any size. For a "timm:" vision transformer,
            pass ``img_size`` in kwargs.
        pretrained_path: a local weights file loaded after building (see :func:`load_pretrained`); nothing is
            ever downloaded.
        kwargs: the architecture's own options, e.g. ``drop_rate`` for the Wide ResNets, ``depth`` / ``alpha`` /
            ``bottleneck`` for PyramidNet, any ``timm.create_model`` argument for timm models.
    Raises:
        ConfigError: unknown name or kwarg, num_classes or image_size below 1, weights that do not fit.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a whole number of at least 1")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r} must be a whole number of pixels, at least 1")
    if not isinstance(name, str):
        raise ConfigError(f"model.name={name!r} is not a string: choose one of {', '.join(available_models())}")
    if name in CIFAR_MODELS:
        model = _create_cifar_model(name, num_classes, kwargs)
    elif name in TIMM_ALIASES:
        alias = TIMM_ALIASES[name]
        defaults = {**alias.defaults, **({"img_size": image_size} if alias.takes_image_size else {})}
        model = _create_timm_model(alias.timm_name, num_classes, {**defaults, **kwargs})
    elif name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        model = _create_timm_model(name[len(TIMM_PREFIX):], num_classes, kwargs)
    else:
        raise ConfigError(
            f"model.name={name!r} is not a model: choose one of {', '.join(available_models())}, "
            f"or {TIMM_PREFIX}<any timm model name>"
        )
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _create_cifar_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    builder = CIFAR_MODELS[name]
    allowed = [parameter for parameter in inspect.signature(builder).parameters if parameter != "num_classes"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model.kwargs has {', '.join(unknown)}, which {name} does not take: "
            f"allowed are {', '.join(allowed) if allowed else 'none'}"
        )
    return builder(num_classes, **kwargs)


def _create_timm_model(timm_name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    # Imported here: only the timm-backed names need it, and importing it takes about a second.
    import timm

    if not timm.is_model(timm_name):
        raise ConfigError(
            f"model.name={TIMM_PREFIX}{timm_name} is not a timm model: list them with timm.list_models('*pattern*')"
        )
    if "pretrained" in kwargs:
        raise ConfigError(
            "model.kwargs.pretrained is not allowed: nothing is downloaded, give a local file as model.pretrained_path"
        )
    try:
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        # The only inputs that vary are the config's kwargs, so a signature error is theirs.
        raise ConfigError(f"model.kwargs={kwargs} do not fit timm model {timm_name}: {exc}") from exc
