"""Every model by name: the one place a model config becomes an ``nn.Module``."""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from fsam.errors import ConfigError
from fsam.models.mlp import mlp
from fsam.models.pretrained import load_pretrained
from fsam.models.pyramidnet import pyramidnet110
from fsam.models.resnet import resnet18, resnet34, resnet50
from fsam.models.vgg import vgg16_bn, vgg16_bn_release
from fsam.models.wide_resnet import wrn16_8, wrn16_8_release, wrn28_10, wrn28_10_release
from fsam.names import TIMM_PREFIX


# Models written here for 32x32 inputs; each builder takes num_classes, init ("ours" or "release") and its own
# keyword arguments. The *_release names are the F-SAM release's networks where they differ from the standard ones.
CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "wrn28_10": wrn28_10,
    "wrn16_8": wrn16_8,
    "wrn28_10_release": wrn28_10_release,
    "wrn16_8_release": wrn16_8_release,
    "pyramidnet110": pyramidnet110,
    "vgg16_bn": vgg16_bn,
    "vgg16_bn_release": vgg16_bn_release,
    "mlp": mlp,  # sized by the images: the factory passes image_size
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
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier for images [B, 3, image_size, image_size] -> logits [B, num_classes].

    Args:
        name: one of :func:`available_models`, or "timm:<name>" for any timm architecture.
        num_classes: size of the classifier head (at least 1).
        image_size: input height and width in pixels. The ViT aliases build their position embedding for it;
            the CIFAR models and timm CNNs pool globally and accept any size. For a "timm:" vision transformer,
            pass ``img_size`` in kwargs.
        pretrained_path: a local weights file loaded after building (see :func:`load_pretrained`).
        pretrained: timm models only: timm's own pretrained weights, downloaded by timm into its cache (the
            Hugging Face cache, ``HF_HOME``) on first use and read from there afterwards; the classifier head is
            new (``num_classes``). Offline and not cached: a ConfigError saying how to fetch them once.
        kwargs: the architecture's own options, e.g. ``init`` ("ours" or "release": the F-SAM release's
            initialisation of that family) for every model written here, ``drop_rate`` for the Wide ResNets,
            ``depth`` / ``alpha`` / ``bottleneck`` for PyramidNet, any ``timm.create_model`` argument for timm models.
    Raises:
        ConfigError: unknown name or kwarg, a kwarg value the builder refuses, num_classes or image_size below 1,
            weights that do not fit. Values refused only in the forward pass: see :func:`check_forward`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a whole number of at least 1")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r} must be a whole number of pixels, at least 1")
    if not isinstance(name, str):
        raise ConfigError(f"model.name={name!r} is not a string: choose one of {', '.join(available_models())}")
    if pretrained and (name in CIFAR_MODELS or pretrained_path is not None):
        reason = ("the CIFAR models written here have no published weights" if name in CIFAR_MODELS
                  else "model.pretrained_path already gives the weights")
        raise ConfigError(f"model.pretrained=true is not allowed with model.name={name}: {reason}; use "
                          "model.pretrained_path=<a local weights file>, or a timm model")
    if name in CIFAR_MODELS:
        model = _create_cifar_model(name, num_classes, kwargs, image_size)
    elif name in TIMM_ALIASES:
        alias = TIMM_ALIASES[name]
        defaults = {**alias.defaults, **({"img_size": image_size} if alias.takes_image_size else {})}
        model = _create_timm_model(alias.timm_name, num_classes, {**defaults, **kwargs}, pretrained)
    elif name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        model = _create_timm_model(name[len(TIMM_PREFIX):], num_classes, kwargs, pretrained)
    else:
        raise ConfigError(
            f"model.name={name!r} is not a model: choose one of {', '.join(available_models())}, "
            f"or {TIMM_PREFIX}<any timm model name>"
        )
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _create_cifar_model(name: str, num_classes: int, kwargs: dict[str, Any], image_size: int) -> nn.Module:
    builder = CIFAR_MODELS[name]
    parameters = inspect.signature(builder).parameters
    given = ("num_classes", "image_size")  # from the data, not from model.kwargs
    allowed = [parameter for parameter in parameters if parameter not in given]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"model.kwargs has {', '.join(unknown)}, which {name} does not take: "
            f"allowed are {', '.join(allowed) if allowed else 'none'}"
        )
    if "image_size" in parameters:
        kwargs = {**kwargs, "image_size": image_size}
    try:
        return builder(num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # e.g. depth='abc'; the builders raise ConfigError for what they check
        raise ConfigError(f"model.kwargs={kwargs} do not fit {name}: {_first_line(exc)}") from exc


def _create_timm_model(timm_name: str, num_classes: int, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    # Imported here: only the timm-backed names need it, and importing it takes about a second.
    import timm

    if not timm.is_model(timm_name):
        raise ConfigError(
            f"model.name={TIMM_PREFIX}{timm_name} is not a timm model: list them with timm.list_models('*pattern*')"
        )
    if "pretrained" in kwargs:
        raise ConfigError(
            "model.kwargs.pretrained is not allowed: use model.pretrained=true (timm's weights, downloaded once) or "
            "model.pretrained_path=<a local weights file>"
        )
    for key, value in kwargs.items():
        # timm names its dropout-like probabilities *_rate (drop_rate, drop_path_rate, attn_drop_rate,
        # drop_block_rate, ...); some are read only in training mode, where no earlier check would see them.
        if key.endswith("_rate") and value is not None and not _is_probability(value):
            raise ConfigError(f"model.kwargs.{key}={value!r} is not a probability: use a number in [0, 1]")
    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except OSError as exc:  # only a download or a cache read does I/O here: huggingface_hub's errors included
        if pretrained:
            raise _fetch_error(timm_name, exc) from exc
        raise
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        # The only inputs that vary are the config's kwargs, so what timm's builders raise about them is theirs
        # (TypeError: an unknown kwarg; ValueError, KeyError, AssertionError: a value they check).
        raise ConfigError(f"model.kwargs={kwargs} do not fit timm model {timm_name}: {_first_line(exc)}") from exc


def _fetch_error(timm_name: str, error: Exception) -> ConfigError:
    """The one-line error for pretrained weights timm could not fetch (no network, not in the cache)."""
    return ConfigError(
        f"cannot get timm's pretrained weights for {timm_name} ({type(error).__name__}: {_first_line(error)}): "
        f"fetch them once where there is internet (a login node) with python -c \"import timm; "
        f"timm.create_model('{timm_name}', pretrained=True)\" into a cache this machine reads (HF_HOME on shared "
        "storage), or give model.pretrained_path=<a local weights file>"
    )


def check_forward(model: nn.Module, image_size: int, kwargs: Mapping[str, Any] | None = None) -> None:
    """Run one zero image [1, 3, image_size, image_size] through ``model`` to refuse what only fails in forward.

    Some model options are accepted when the model is built and refused only when used: timm passes
    ``drop_rate`` to ``F.dropout`` in ``forward_head``, so ``timm:resnet18`` with ``drop_rate=1.5`` would fail on
    the first training batch, and a timm ViT built for 224 px refuses 32 px inputs. Call it after
    :func:`create_model` (and after moving the model to its device), before wrapping it in DDP.

    The pass runs in eval mode under ``torch.no_grad()``: it draws no random numbers, moves no BatchNorm
    statistic, and costs one forward of one image. Every module's training flag is put back as it was.

    Args:
        model: the built classifier, on the device and in the dtype of its parameters.
        image_size: the side in pixels of the images it will get.
        kwargs: the config's ``model.kwargs``, shown in the error.
    Raises:
        ConfigError: the pass raised TypeError, ValueError or AssertionError (timm checks input sizes with
            asserts); the message names model.kwargs, the image size and the first line of the error.
    """
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"model.kwargs={dict(kwargs or {})} do not work in the model's forward pass on a {image_size}x"
            f"{image_size} image: {_first_line(exc)}; fix model.kwargs (or dataset.image_size)"
        ) from exc
    finally:
        for module, training in flags:
            module.training = training


def _is_probability(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (without its full stop), or the type alone for an empty message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].strip().rstrip('.')}" if lines else type(error).__name__
