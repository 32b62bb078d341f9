"""The Hessian of the loss over a set of images, through Hessian-vector products: its largest eigenvalues (power
iteration with deflation) and its trace (Hutchinson's estimator, with the standard error over the probes).

H is the Hessian of the mean loss over every example of ``batches`` with respect to every trainable parameter,
with the model in eval mode (:mod:`fsam.analysis.measurement`). A product H v costs, per batch, one forward pass
and two backward passes (the gradient with its graph kept, then the gradient of g·v through it: a double
backward); on this project's CPU that measured 4 times a plain forward and backward (docs/sharpness.md).
:func:`top_eigenvalues` needs ``k * iterations`` products at most and :func:`hessian_trace` one per probe.

Written here with ``torch.autograd.grad`` rather than taken from ``hessian-eigenthings`` (PyPI, evaluated at
1.0.0a5): that package is an alpha whose 1.0 series replaced its whole earlier API, and its Hessian operator
averages the batches' products with equal weights, so a smaller last batch counts as much as a full one; the
products and both algorithms are a few dozen lines on torch alone, with one seeded generator for every draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from fsam.analysis.measurement import (
    Batches, LossFn, Vector, dot, gaussian_like, measurement_mode, norm, rademacher_like,
)


def _product(model: nn.Module, loss_fn: LossFn, batches: Batches, params: Sequence[torch.Tensor],
             vector: Sequence[torch.Tensor]) -> Vector:
    """H v for the model as it is: per batch, the gradient of (size * mean loss) with its graph, then the gradient
    of its inner product with v; summed over batches and divided by the number of examples."""
    total = [torch.zeros_like(p) for p in params]
    count = 0
    with torch.enable_grad():
        for inputs, targets in batches:
            size = inputs.shape[0]
            loss = loss_fn(model(inputs), targets) * size
            gradient = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            inner = sum(torch.sum(g * v) for g, v in zip(gradient, vector) if g is not None)
            count += size
            if not torch.is_tensor(inner) or not inner.requires_grad:
                continue  # the gradient does not depend on the weights here: this batch's Hessian is zero
            for accumulated, product in zip(total, torch.autograd.grad(inner, params, allow_unused=True)):
                if product is not None:
                    accumulated.add_(product)
    if count == 0:
        raise ValueError("the batches held no example: give at least one (inputs, targets) batch")
    return [accumulated.div_(count) for accumulated in total]


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, batches: Batches,
                           vector: Sequence[torch.Tensor]) -> Vector:
    """H v: ``vector`` holds one tensor per trainable parameter (model order, their shapes); so does the result.

    ``loss_fn(outputs, targets)`` returns the 0-dim mean loss of a batch (no weight decay: that is the
    optimizer's). The model is measured in eval mode and left exactly as it was."""
    with measurement_mode(model) as params:
        return _product(model, loss_fn, batches, params, vector)


@dataclass(frozen=True)
class TopEigenvalues:
    """The result of :func:`top_eigenvalues`.

    ``values``: the eigenvalues in the order found, each the largest in magnitude left after the earlier ones were
    deflated (at a minimum of the loss: the largest, λ_max first). ``iterations``: the products each took.
    ``relative_changes``: |λ_t − λ_{t−1}| / |λ_t| at its last iteration (NaN after a single one).
    ``converged``: that change was below the tolerance. ``hessian_vector_products``: the products in all.
    """

    values: list[float]
    iterations: list[int]
    relative_changes: list[float]
    converged: list[bool]
    hessian_vector_products: int


def _project_out(vector: Vector, found: list[Vector]) -> None:
    """Remove from ``vector`` (in place) its components along the unit vectors ``found``."""
    for unit in found:
        coefficient = dot(vector, unit)
        for component, direction in zip(vector, unit):
            component.sub_(direction, alpha=coefficient)


def _scale(vector: Vector, factor: float) -> Vector:
    return [component.mul_(factor) for component in vector]


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    k: int = 1,
    iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TopEigenvalues:
    """The ``k`` eigenvalues of H of largest magnitude, by power iteration with deflation.

    Each eigenvalue starts from a Gaussian vector (drawn on the CPU from a generator seeded with ``seed``, so the
    same seed gives the same numbers on any device), kept orthogonal to the eigenvectors already found, and
    repeats v <- H v / ||H v|| until the Rayleigh quotient vᵀHv changes by less than ``tolerance`` relative to
    itself, or ``iterations`` products have been taken. ``batches`` is iterated once per product, so it must
    start over each time (a list of batches does). ``progress`` is called with 1 after each product.
    """
    if k < 1 or iterations < 1 or tolerance < 0:
        raise ValueError(f"k={k}, iterations={iterations} and tolerance={tolerance} are not allowed: k and "
                         "iterations must be >= 1, tolerance >= 0")
    generator = torch.Generator().manual_seed(seed)
    values: list[float] = []
    taken: list[int] = []
    changes: list[float] = []
    found: list[Vector] = []
    with measurement_mode(model) as params:
        for _ in range(k):
            vector = gaussian_like(params, generator)
            _project_out(vector, found)
            vector = _scale(vector, 1.0 / norm(vector))
            value, change, steps = 0.0, float("nan"), 0
            while steps < iterations:
                product = _product(model, loss_fn, batches, params, vector)
                steps += 1
                if progress is not None:
                    progress(1)
                previous, value = value, dot(vector, product)
                change = abs(value - previous) / abs(value) if steps > 1 and value != 0 else float("nan")
                _project_out(product, found)  # deflation: H acts on what the earlier eigenvectors leave
                length = norm(product)
                if length == 0.0:
                    break  # H is zero on what is left: the eigenvalue is 0 and every vector is its eigenvector
                vector = _scale(product, 1.0 / length)
                if change < tolerance:
                    break
            found.append(vector)
            values.append(value)
            taken.append(steps)
            changes.append(change)
    return TopEigenvalues(values, taken, changes, [change < tolerance for change in changes], sum(taken))


@dataclass(frozen=True)
class HessianTrace:
    """The result of :func:`hessian_trace`: ``value`` (the mean of vᵀHv over the probes), ``standard_error``
    (their sample standard deviation, n − 1 denominator, over √probes; NaN for one probe), ``probes`` and each
    probe's vᵀHv in ``samples``."""

    value: float
    standard_error: float
    probes: int
    samples: list[float]


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    probes: int = 20,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> HessianTrace:
    """Hutchinson's estimate of tr(H): the mean of vᵀHv over ``probes`` Rademacher vectors v (entries ±1, drawn
    on the CPU from a generator seeded with ``seed``), unbiased because E[v vᵀ] = I. ``progress`` is called with 1
    after each probe."""
    if probes < 1:
        raise ValueError(f"probes={probes} is not allowed: give 1 or more")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with measurement_mode(model) as params:
        for _ in range(probes):
            probe = rademacher_like(params, generator)
            samples.append(dot(probe, _product(model, loss_fn, batches, params, probe)))
            if progress is not None:
                progress(1)
    values = torch.tensor(samples, dtype=torch.float64)
    error = float(values.std(unbiased=True)) / probes ** 0.5 if probes > 1 else float("nan")
    return HessianTrace(float(values.mean()), error, probes, samples)
