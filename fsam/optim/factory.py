"""Build any of the methods from plain settings: the one place a config becomes an optimizer."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from fsam.errors import ConfigError
from fsam.names import BASE_OPTIMIZERS, METHOD_REGISTRY, METHODS, PERTURBATIONS
from fsam.optim.sam import FSAM, SAM


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """One group, or two when norms and biases (every parameter with fewer than 2 dimensions) get no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def create_optimizer(
    model_or_params: nn.Module | Iterable[Any],
    name: str = "fsam",
    *,
    base: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    rho: float | None = None,
    sigma: float = 1.0,
    lmbda: float = 0.6,
    eta: float = 0.0,
    ema_order: str = "code",
    perturbation: str = "minibatch",
    no_decay_norm_and_bias: bool = False,
) -> torch.optim.Optimizer:
    """Build a method around a base optimizer.

    Args:
        model_or_params: a model (its trainable parameters are used) or parameters / param groups.
        name: "sgd" (the base optimizer alone), "sam", "asam" (SAM with adaptive=True), "fsam", "fasam"
            (F-SAM with the ASAM scaling).
        base: "sgd" (momentum, coupled weight decay) or "adamw" (decoupled weight decay).
        lr, momentum, nesterov, weight_decay, betas: the base optimizer's settings (momentum and nesterov for
            SGD, betas for AdamW).
        rho: the perturbation radius; None is the method's own (:data:`fsam.names.METHOD_REGISTRY`: SAM 0.1,
            F-SAM 0.2, ASAM and F-ASAM 1.0), as in the configs.
        sigma, lmbda, eta, ema_order: see :class:`SAM` and :class:`FSAM`.
        perturbation: "sam" only: "minibatch" (SAM), "full" or "noise" (the Figure-1 analysis directions, see
            :class:`SAM`; the caller provides the full-batch gradient with ``set_full_gradient``).
        no_decay_norm_and_bias: put parameters with fewer than 2 dimensions in a group without weight decay
            (needs a model).
    Returns:
        a torch optimizer for "sgd", otherwise a :class:`SAM` or :class:`FSAM` whose ``base_optimizer`` is it.
    """
    if name not in METHODS:
        raise ConfigError(f"optimizer.name={name!r} is not a method: choose one of {', '.join(METHODS)}")
    if base not in BASE_OPTIMIZERS:
        raise ConfigError(f"optimizer.base={base!r} is not a base optimizer: choose one of {', '.join(BASE_OPTIMIZERS)}")
    if perturbation not in PERTURBATIONS:
        raise ConfigError(
            f"optimizer.perturbation={perturbation!r} is not allowed: use one of {', '.join(PERTURBATIONS)}"
        )
    if perturbation != "minibatch" and name != "sam":
        raise ConfigError(
            f"optimizer.perturbation={perturbation!r} is not allowed with optimizer.name={name!r}: the analysis "
            "directions belong to sam (use optimizer.name=sam, or perturbation=minibatch)"
        )
    if rho is None:
        rho = METHOD_REGISTRY[name].rho
    if isinstance(model_or_params, nn.Module):
        groups = param_groups(model_or_params, weight_decay, no_decay_norm_and_bias)
    else:
        if no_decay_norm_and_bias:
            raise ConfigError("no_decay_norm_and_bias needs the model, not a list of parameters")
        groups = list(model_or_params)
    if base == "sgd":
        base_optimizer = _fused_or_foreach(
            torch.optim.SGD, groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    else:
        base_optimizer = _fused_or_foreach(
            torch.optim.AdamW, groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay
        )
    try:
        if name == "sgd":
            return base_optimizer
        if name in ("sam", "asam"):
            return SAM(None, base_optimizer, rho=rho, adaptive=name == "asam", eta=eta, perturbation=perturbation)
        return FSAM(
            None, base_optimizer, rho=rho, sigma=sigma, lmbda=lmbda, ema_order=ema_order, adaptive=name == "fasam", eta=eta
        )
    except ValueError as exc:
        raise ConfigError(f"optimizer.{exc}") from exc


def _fused_or_foreach(cls: type[torch.optim.Optimizer], groups: list, **kwargs: Any) -> torch.optim.Optimizer:
    """The base optimizer with torch's fused kernel (one pass over weights, gradients and state instead of three
    or four) where this torch and these parameters' devices and dtypes have one; the foreach version otherwise.

    Fused optimizers see only unscaled gradients here: ``train_step`` unscales before stepping.
    """
    try:
        return cls([dict(group) for group in groups], fused=True, **kwargs)  # copies: a refusal leaves them as given
    except (RuntimeError, ValueError, TypeError):
        return cls(groups, foreach=True, **kwargs)
