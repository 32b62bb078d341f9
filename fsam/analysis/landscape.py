"""The loss along lines and planes through the weights: 1-D and 2-D slices along filter-normalised random
directions (Li et al., *Visualizing the Loss Landscape of Neural Nets*, NeurIPS 2018), and the line from one
model's weights to another's (e.g. SGD's and F-SAM's final weights of the same seed).

**Filter normalisation.** A direction d is drawn Gaussian, then each filter of it is rescaled to the norm of the
matching filter of the weights: for a weight tensor of two or more dimensions (a convolution [out, in, kh, kw] or
a linear layer [out, in]) a filter is one output unit's slice ``[i]``, and ``d[i] <- d[i] / ||d[i]|| * ||w[i]||``.
One-dimensional tensors (biases, BatchNorm's scale and shift) get a zero direction, as in Li et al. A step of α
along d then moves every filter by α times its own size, so slices of networks whose weights differ in scale
(weight decay, BatchNorm's scale invariance) compare.

**The line between two models.** w(t) = (1 − t) w_A + t w_B, with t = 0 the model measured and t = 1 the other.
BatchNorm's running mean and variance are interpolated the same way (the other buffers are the model's own), so
t = 0 and t = 1 are each network exactly as it was trained and evaluated; the statistics are not recomputed for
the weights in between, where interpolated statistics may not match the activations (Jordan et al., *REPAIR*,
ICLR 2023), which can raise the loss between two solutions beyond what the weights alone would.

Every loss is the mean over all examples of ``batches`` in eval mode (:mod:`fsam.analysis.measurement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fsam.analysis.measurement import (
    Batches, LossFn, Vector, mean_loss, measurement_mode, place, trainable_parameters,
)

# The buffers the line interpolates: those that change what eval mode computes.
INTERPOLATED_BUFFERS = ("running_mean", "running_var")


def filter_normalised_directions(model: nn.Module, count: int = 1, *, seed: int = 0) -> list[Vector]:
    """``count`` filter-normalised random directions (see the module docstring), each one tensor per trainable
    parameter. They are drawn one after the other from a CPU generator seeded with ``seed`` (in each parameter's
    dtype, then moved to its device), so the first direction is the same whatever ``count``, and the same seed gives
    the same directions on any device."""
    generator = torch.Generator().manual_seed(seed)
    params = trainable_parameters(model)
    directions = []
    for _ in range(count):
        direction = []
        for weight in params:
            if weight.dim() < 2:
                direction.append(torch.zeros_like(weight))
                continue
            drawn = torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device)
            drawn_norms = drawn.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))
            weight_norms = weight.detach().flatten(1).norm(dim=1).view_as(drawn_norms)
            direction.append(drawn * (weight_norms / drawn_norms))
        directions.append(direction)
    return directions


@dataclass(frozen=True)
class Slice:
    """Losses along a slice: ``losses[i]`` at ``alphas[i]`` (1-D), or ``losses[i][j]`` at (``alphas[i]``,
    ``betas[j]``) (2-D, ``betas`` not empty). Units: the loss's own (nats for cross-entropy)."""

    alphas: list[float]
    losses: list[Any]
    betas: list[float] | None = None


def loss_slice(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    directions: Sequence[Vector],
    alphas: Sequence[float],
    betas: Sequence[float] | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> Slice:
    """The mean loss at w + α d₁ for every α of ``alphas`` (one direction), or at w + α d₁ + β d₂ for every α and β
    (two directions and ``betas``). The directions are parameter-shaped vectors (e.g. from
    :func:`filter_normalised_directions`). ``progress`` is called with 1 after each point."""
    if len(directions) != (1 if betas is None else 2):
        raise ValueError(f"loss_slice() got {len(directions)} directions: give one, or two with betas")
    with measurement_mode(model) as params:
        origin = [p.detach().clone() for p in params]

        def loss_at(steps: list[tuple[float, Vector]]) -> float:
            place(params, origin, steps)
            loss = mean_loss(model, loss_fn, batches)
            if progress is not None:
                progress(1)
            return loss

        if betas is None:
            return Slice([float(a) for a in alphas], [loss_at([(a, directions[0])]) for a in alphas])
        grid = [[loss_at([(a, directions[0]), (b, directions[1])]) for b in betas] for a in alphas]
        return Slice([float(a) for a in alphas], grid, [float(b) for b in betas])


def loss_along_line(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    other: Mapping[str, torch.Tensor],
    ts: Sequence[float],
    *,
    progress: Callable[[int], None] | None = None,
) -> Slice:
    """The mean loss at (1 − t) w + t w_other for every t of ``ts``, ``other`` being the other model's
    ``state_dict()``: trainable parameters and BatchNorm's running mean and variance are interpolated, the rest is
    the model's own (see the module docstring). ``progress`` is called with 1 after each point.

    Raises:
        ValueError: ``other`` lacks an entry of the model, or has one of another shape (another architecture).
    """
    own = model.state_dict(keep_vars=True)
    moving = {id(p) for p in trainable_parameters(model)}
    names = [name for name, tensor in own.items()
             if id(tensor) in moving or name.rsplit(".", 1)[-1] in INTERPOLATED_BUFFERS]
    for name in names:
        if name not in other or tuple(other[name].shape) != tuple(own[name].shape):
            found = "missing" if name not in other else f"of shape {tuple(other[name].shape)}"
            raise ValueError(f"the other model's {name} is {found} where this model has {tuple(own[name].shape)}: "
                             "the line needs two models of one architecture")
    with measurement_mode(model):
        tensors = [own[name] for name in names]
        start = [tensor.detach().clone() for tensor in tensors]
        end = [other[name].detach().to(device=t.device, dtype=t.dtype) for name, t in zip(names, start)]
        losses = []
        for t in ts:
            with torch.no_grad():
                for tensor, a, b in zip(tensors, start, end):
                    # (1 - t) a + t b, not a + t (b - a): at t = 0 and t = 1 the result is a or b to the bit
                    tensor.copy_(a).mul_(1.0 - t).add_(b, alpha=float(t))
            losses.append(mean_loss(model, loss_fn, batches))
            if progress is not None:
                progress(1)
    return Slice([float(t) for t in ts], losses)
