"""What every measurement of :mod:`fsam.analysis` sees and leaves behind.

A measurement looks at the model as it is, in **eval mode**: BatchNorm normalises with its running statistics
(the network a test evaluation sees) and dropout is off, so the loss is a deterministic function of the weights
and of each example alone, and the batching of the images does not change it. Inside :func:`measurement_mode` the
weights may be moved at will (perturbed, interpolated); on leaving it every parameter and buffer holds exactly its
old bits again (copied back, never subtracted), each module is back in its old train/eval mode, and ``.grad`` is
as it was (gradients are taken with ``torch.autograd.grad``, which never writes ``.grad``).

Parameter-shaped vectors (a direction, a perturbation, a Hessian-vector product) are lists of tensors, one per
trainable parameter in ``model.parameters()`` order (:func:`trainable_parameters`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Vector = list[torch.Tensor]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a measurement differentiates and moves: those with ``requires_grad``, in model order."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


@contextmanager
def measurement_mode(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """The model in eval mode for the block; afterwards its parameters and buffers hold exactly the values they
    had before (whatever the block did to them, an exception included) and every module its old train/eval mode.
    Yields :func:`trainable_parameters`."""
    modes = [(module, module.training) for module in model.modules()]
    tensors = [*model.parameters(), *model.buffers()]
    saved = [tensor.detach().clone() for tensor in tensors]
    model.eval()
    try:
        yield trainable_parameters(model)
    finally:
        with torch.no_grad():
            for tensor, old in zip(tensors, saved):
                tensor.copy_(old)
        for module, training in modes:
            module.training = training


@torch.no_grad()
def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Batches) -> float:
    """The mean of ``loss_fn`` over every example of ``batches``: each batch's mean loss weighted by its size,
    summed in float64. The model is used as it is (call inside :func:`measurement_mode`)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        size = inputs.shape[0]
        total += float(loss_fn(model(inputs), targets).double()) * size
        count += size
    if count == 0:
        raise ValueError("the batches held no example: give at least one (inputs, targets) batch")
    return total / count


@torch.no_grad()
def place(params: Sequence[torch.Tensor], origin: Sequence[torch.Tensor],
          steps: Sequence[tuple[float, Vector]]) -> None:
    """Set ``params`` to ``origin + sum(coefficient * direction)`` over ``steps`` ((coefficient, direction)
    pairs), computed from ``origin`` every time, so that moving the weights around never accumulates rounding."""
    for index, (parameter, start) in enumerate(zip(params, origin)):
        parameter.copy_(start)
        for coefficient, direction in steps:
            if coefficient:
                parameter.add_(direction[index], alpha=coefficient)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The inner product of two parameter-shaped vectors, summed in float64."""
    return float(sum(torch.sum(x.double() * y.double()) for x, y in zip(a, b)))


def norm(vector: Sequence[torch.Tensor]) -> float:
    """The L2 norm of a parameter-shaped vector over all its tensors at once (float64)."""
    return dot(vector, vector) ** 0.5


def gaussian_like(params: Sequence[torch.Tensor], generator: torch.Generator) -> Vector:
    """Standard normal entries shaped like ``params``, drawn on the CPU (in each parameter's dtype, in order) so
    the same generator state gives the same numbers on any device."""
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]


def rademacher_like(params: Sequence[torch.Tensor], generator: torch.Generator) -> Vector:
    """Entries +1 or -1 with equal probability, shaped like ``params``, drawn on the CPU like :func:`gaussian_like`."""
    return [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(device=p.device, dtype=p.dtype)
            for p in params]
