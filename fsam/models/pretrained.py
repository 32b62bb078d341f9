"""Load weights from a local file into a built model, replacing the classifier head when the classes differ."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from fsam.errors import ConfigError

logger = logging.getLogger(__name__)

# Wrappers that prefix every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_KEYS_SHOWN = 3


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Copy the weights in ``path`` into ``model`` in place.

    ``path`` is a ``torch.save`` of a state dict, of a dict holding one under "model" or "state_dict", or a
    ``.safetensors`` file. When the classifier head (``model.get_classifier()``) has another shape in the file,
    as in fine-tuning ImageNet weights on CIFAR-100, the file's head is dropped with a warning and the model keeps
    its freshly initialised one. Any other missing, unexpected or differently shaped key raises ConfigError.
    """
    path = Path(path)
    state = _read_state_dict(path)
    expected = model.state_dict()
    head_prefixes = _classifier_prefixes(model)

    def in_head(key: str) -> bool:
        return key.startswith(head_prefixes)

    head_differs = any(
        in_head(key) and key in expected and tuple(value.shape) != tuple(expected[key].shape)
        for key, value in state.items()
    )
    dropped = sorted(key for key in state if head_differs and in_head(key))
    state = {key: value for key, value in state.items() if key not in dropped}

    missing = [key for key in expected if key not in state and not (head_differs and in_head(key))]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} (file {list(state[key].shape)}, model {list(expected[key].shape)})"
        for key in state
        if key in expected and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        f"{label} {', '.join(keys[:_KEYS_SHOWN])}{' ...' if len(keys) > _KEYS_SHOWN else ''} ({len(keys)} in all)"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped))
        if keys
    ]
    if problems:
        raise ConfigError(
            f"model.pretrained_path={str(path)!r} does not fit the {type(model).__name__} built from model.name: "
            + "; ".join(problems)
        )
    if head_differs:
        logger.warning(
            "%s: classifier head shape differs from the model's (%s), so it is left freshly initialised: dropped %s",
            path,
            ", ".join(f"{key} {list(expected[key].shape)}" for key in sorted(expected) if in_head(key)),
            ", ".join(dropped),
        )
    model.load_state_dict(state, strict=not head_differs)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file, on the CPU, with any DDP / torch.compile key prefix removed."""
    if not path.is_file():
        raise ConfigError(f"model.pretrained_path={str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ConfigError(
                f"model.pretrained_path={str(path)!r} is a .safetensors file: pip install safetensors"
            ) from exc
    try:
        if path.suffix == ".safetensors":
            loaded: object = load_file(path, device="cpu")
        else:
            # weights_only: a weights file must never run code from its pickle.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the path may name any file at all, and each reader fails its own
        # way: a text file makes torch's unpickler raise KeyError, a truncated file EOFError, a pickled object
        # UnpicklingError, a corrupt .safetensors file safetensors' own errors. All mean "not a weights file".
        raise ConfigError(
            f"model.pretrained_path={str(path)!r} cannot be loaded as weights ({_load_failure(exc)}): expected a "
            f"file written by torch.save(model.state_dict(), path) (or a dict holding it under 'model' or "
            f"'state_dict'), or a .safetensors file"
        ) from exc
    if isinstance(loaded, Mapping):
        for wrapper_key in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper_key), Mapping):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(
            f"model.pretrained_path={str(path)!r} holds no state dict: expected a mapping of names to tensors, "
            "alone or under the key 'model' or 'state_dict'"
        )
    state = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _load_failure(error: BaseException) -> str:
    """What the reader found wrong, in one sentence.

    torch's messages run on: under weights_only one opens with a paragraph about the weights_only default (the
    reason follows "WeightsUnpickler error:"), then suggests allowlisting the pickled class in code, which a config
    cannot do; a corrupt zip archive is followed by advice about corrupted checkpoints. The first sentence is kept.
    """
    text = str(error)
    _, marker, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if marker else text).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0].partition('. ')[0].rstrip('.')}"


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes ("fc.", "head.") of the module(s) ``model.get_classifier()`` returns; none without that method."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return ()
    heads = get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return tuple(f"{name}." for name, module in model.named_modules() if name and any(module is head for head in heads))
