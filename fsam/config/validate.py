"""Turn a plain mapping (Hydra's composed config, a dict, a YAML file's content) into a checked RunConfig.

Every key is checked before anything is built: unknown keys, types and each field's rule, then the few
constraints between keys. The first problem raises :class:`fsam.errors.ConfigError` with a one-line message
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fsam.config.schema import RunConfig
from fsam.errors import ConfigError
from fsam.names import METHOD_REGISTRY, MODEL_NAMES, TIMM_PREFIX

T = TypeVar("T")


def load_config(config: Mapping[str, Any] | RunConfig) -> RunConfig:
    """A checked :class:`RunConfig` from a nested mapping; missing keys take the schema's defaults."""
    if isinstance(config, RunConfig):
        return config
    run = _with_method_defaults(_build(RunConfig, config, ""))
    _check_across_keys(run)
    return run


def _with_method_defaults(run: RunConfig) -> RunConfig:
    """``optimizer.rho`` null becomes the method's own radius (SGD has none and keeps null)."""
    if run.optimizer.rho is not None:
        return run
    optimizer = dataclasses.replace(run.optimizer, rho=METHOD_REGISTRY[run.optimizer.name].rho)
    return dataclasses.replace(run, optimizer=optimizer)


def to_plain(config: Any) -> Any:
    """A dataclass (or anything nested in one) as JSON/YAML-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(key): to_plain(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(value) for value in config]
    return config


def _build(cls: type[T], mapping: Any, prefix: str) -> T:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={mapping!r} is not allowed: must be a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, mapping)) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]} is not a known key: allowed under {prefix.rstrip('.') or 'the top level'} "
            f"are {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        key = prefix + name
        if name not in mapping:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key} is missing: it has no default, give it a value")
            continue
        value = _typed(mapping[name], hints[name], key)
        rule = spec.metadata.get("rule")
        if rule is not None and value is not None and not rule.allows(value):
            raise ConfigError(f"{key}={_show(value)} is not allowed: {rule.text}")
        values[name] = value
    return cls(**values)


def _typed(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (ints are accepted as floats, nothing else is converted)."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in arguments if a is not type(None)]
        return _typed(value, inner, key)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key + ".")
    if annotation is bool:
        return _expect(value, isinstance(value, bool), key, "must be true or false")
    if annotation is int:
        return _expect(value, isinstance(value, int) and not isinstance(value, bool), key, "must be a whole number")
    if annotation is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _expect(value, is_number, key, "must be a number")
        return float(_expect(value, math.isfinite(value), key, "must be a finite number"))
    if annotation is str:
        if isinstance(value, bool):
            raise ConfigError(
                f"{key}={value} is not allowed: must be a string (YAML reads off, on, yes and no as true/false: "
                f'quote them, "off")'
            )
        return _expect(value, isinstance(value, str), key, "must be a string")
    if origin is list:
        _expect(value, isinstance(value, (list, tuple)), key, "must be a list")
        return [_typed(item, arguments[0], f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is tuple:
        fits = isinstance(value, (list, tuple)) and len(value) == len(arguments)
        _expect(value, fits, key, f"must be a list of {len(arguments)} values")
        return tuple(_typed(item, kind, f"{key}[{index}]") for index, (item, kind) in enumerate(zip(value, arguments)))
    if origin is dict:
        _expect(value, isinstance(value, Mapping), key, "must be a mapping")
        return {str(k): to_plain(v) for k, v in value.items()}
    raise TypeError(f"the schema type {annotation!r} of {key} is not handled")


def _expect(value: Any, ok: bool, key: str, allowed: str) -> Any:
    if not ok:
        raise ConfigError(f"{key}={_show(value)} is not allowed: {allowed}")
    return value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(to_plain(value))


def _check_across_keys(run: RunConfig) -> None:
    name = run.model.name
    if name not in MODEL_NAMES and not (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        raise ConfigError(
            f"model.name={name!r} is not a model: choose one of {', '.join(MODEL_NAMES)}, "
            f"or {TIMM_PREFIX}<any timm model name>"
        )
    # The builder's arguments that other keys give (num_classes is checked against the data set when it is built).
    given_elsewhere = {"image_size": "dataset.image_size", "pretrained": "model.pretrained",
                       "pretrained_path": "model.pretrained_path"}
    for key in sorted(set(run.model.kwargs) & set(given_elsewhere)):
        raise ConfigError(
            f"model.kwargs.{key} is not allowed: it is given by {given_elsewhere[key]}; set that instead"
        )
    trainer = run.trainer
    if trainer.micro_batches > trainer.batch_size:
        raise ConfigError(
            f"trainer.micro_batches={trainer.micro_batches} is not allowed with trainer.batch_size="
            f"{trainer.batch_size}: must be <= the batch size"
        )
    if run.schedule.warmup_epochs >= trainer.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs={run.schedule.warmup_epochs:g} is not allowed with trainer.epochs="
            f"{trainer.epochs}: must be smaller than the number of epochs"
        )
    optimizer = run.optimizer
    if optimizer.perturbation != "minibatch" and optimizer.name != "sam":
        raise ConfigError(
            f"optimizer.perturbation={optimizer.perturbation!r} is not allowed with optimizer.name="
            f"{optimizer.name!r}: the analysis directions belong to sam (use optimizer=sam, or perturbation=minibatch)"
        )
    if run.dataset.name == "imagenet" and (optimizer.perturbation != "minibatch" or trainer.full_grad_analysis_every):
        key, value = (("optimizer.perturbation", repr(optimizer.perturbation)) if optimizer.perturbation != "minibatch"
                      else ("trainer.full_grad_analysis_every", trainer.full_grad_analysis_every))
        raise ConfigError(
            f"{key}={value} is not allowed with dataset.name='imagenet': the exact full-batch gradient is computed "
            "for the device-resident data sets only (cifar10, cifar100, digits)"
        )
    if run.schedule.name != "multistep" and run.schedule.milestones:
        raise ConfigError(
            f"schedule.milestones={run.schedule.milestones} is not allowed with schedule.name="
            f"{run.schedule.name!r}: milestones belong to multistep"
        )
