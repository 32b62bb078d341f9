"""ρ-sharpness (Andriushchenko et al., ICML 2023): how much the loss of a batch of m examples can rise when the
weights move by at most ρ, in the worst case and on average over random directions; plain (an L2 ball) or
adaptive (ASAM's geometry: the ball scaled element-wise by |w|).

For each batch B of ``batches`` (one sample of m-sharpness, m its size) and weights w:

* plain: perturbations δ with ||δ||₂ <= ρ; adaptive: δ = |w| ⊙ u with ||u||₂ <= ρ, |w| taken at the measured
  weights (Kwon et al.'s ASAM with η = 0), so every weight may move in proportion to its own size;
* **average case**: the mean of L_B(w + δ) − L_B(w) over ``random_directions`` perturbations on the sphere of
  radius ρ (u Gaussian, scaled to length ρ), i.e. random directions at the full radius;
* **worst case**: the largest L_B(w + δ) − L_B(w) found in the ball by projected gradient ascent: it starts from
  the random direction that raised the loss most and takes ``ascent_steps`` steps of length ρ (SAM's own step)
  along the normalised gradient with respect to u, each followed by the projection back onto the ball; the
  largest loss of every point visited, the random directions included, is kept. It is a lower bound on the true
  maximum, and never below the average case.

Both are averaged over the batches with equal weights (give batches of one size m). Cost per batch: one forward
pass per random direction, one forward and backward per ascent step, one forward at the end.

Andriushchenko et al. found that these measures correlate weakly with generalisation across architectures and
training settings: report them as diagnostics beside accuracy, not as a predictor of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fsam.analysis.measurement import Batches, LossFn, Vector, gaussian_like, measurement_mode, norm, place


@dataclass(frozen=True)
class RhoSharpness:
    """The result of :func:`rho_sharpness`: ``worst_case`` and ``average_case`` (mean over batches of the loss
    increase, in the loss's units), the same per batch (``worst_per_batch``, ``average_per_batch``), each batch's
    unperturbed loss (``loss_per_batch``) and size (``batch_sizes``), and the settings they were measured with."""

    rho: float
    adaptive: bool
    worst_case: float
    average_case: float
    worst_per_batch: list[float]
    average_per_batch: list[float]
    loss_per_batch: list[float]
    batch_sizes: list[int]
    ascent_steps: int
    random_directions: int


def rho_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    rho: float,
    *,
    adaptive: bool = False,
    ascent_steps: int = 10,
    random_directions: int = 10,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RhoSharpness:
    """Worst-case and average-case ρ-sharpness of the model on each batch of ``batches``, averaged (see the module
    docstring). Random directions come from one CPU generator seeded with ``seed``, drawn batch after batch.
    ``progress`` is called with 1 after each batch. The model is measured in eval mode and left as it was."""
    if rho <= 0 or ascent_steps < 0 or random_directions < 1:
        raise ValueError(f"rho={rho}, ascent_steps={ascent_steps} and random_directions={random_directions} are "
                         "not allowed: rho must be > 0, ascent_steps >= 0 and random_directions >= 1")
    generator = torch.Generator().manual_seed(seed)
    worst, average, losses, sizes = [], [], [], []
    with measurement_mode(model) as params:
        origin = [p.detach().clone() for p in params]
        # The geometry: δ = scale ⊙ u with ||u|| <= rho; plain is scale 1.
        scale = [w.abs() for w in origin] if adaptive else [torch.ones_like(w) for w in origin]

        def loss_at(u: Vector, inputs: torch.Tensor, targets: torch.Tensor) -> float:
            place(params, origin, [(1.0, [s * c for s, c in zip(scale, u)])])
            with torch.no_grad():
                return float(loss_fn(model(inputs), targets))

        def loss_and_ascent(u: Vector, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, Vector]:
            """The batch loss at w + scale ⊙ u and its gradient with respect to u, scale ⊙ ∇L."""
            place(params, origin, [(1.0, [s * c for s, c in zip(scale, u)])])
            with torch.enable_grad():
                loss = loss_fn(model(inputs), targets)
                gradient = torch.autograd.grad(loss, params, allow_unused=True)
            return float(loss.detach()), [s * g if g is not None else torch.zeros_like(s)
                                          for s, g in zip(scale, gradient)]

        for inputs, targets in batches:
            base = loss_at([torch.zeros_like(w) for w in origin], inputs, targets)
            # Only the best direction is kept (one parameter-sized vector, not one per direction).
            highest, u, summed = -float("inf"), None, 0.0
            for _ in range(random_directions):
                candidate = gaussian_like(origin, generator)
                length = norm(candidate)
                candidate = [c * (rho / length) for c in candidate]
                loss = loss_at(candidate, inputs, targets)
                summed += loss
                if loss > highest:
                    highest, u = loss, candidate
            for _ in range(ascent_steps):
                loss, step = loss_and_ascent(u, inputs, targets)
                highest = max(highest, loss)
                length = norm(step)
                if length == 0.0:
                    break  # a flat spot: no direction to climb
                u = [c + g * (rho / length) for c, g in zip(u, step)]
                reach = norm(u)
                if reach > rho:
                    u = [c * (rho / reach) for c in u]
            if ascent_steps:
                highest = max(highest, loss_at(u, inputs, targets))  # where the last step arrived
            losses.append(base)
            sizes.append(int(inputs.shape[0]))
            worst.append(highest - base)
            average.append(summed / random_directions - base)
            if progress is not None:
                progress(1)
    if not sizes:
        raise ValueError("the batches held no example: give at least one (inputs, targets) batch")
    return RhoSharpness(rho, adaptive, sum(worst) / len(worst), sum(average) / len(average), worst, average, losses,
                        sizes, ascent_steps, random_directions)
