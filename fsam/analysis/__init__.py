"""Sharpness and loss-landscape measurements of a trained network, usable in any script (no Hydra, no run folder).

    from fsam.analysis import filter_normalised_directions, hessian_trace, loss_slice, rho_sharpness, top_eigenvalues
    batches = [(images, labels), ...]      # float32 [B, 3, H, W] and int64 [B]; a list: it is read once per pass
    loss_fn = torch.nn.CrossEntropyLoss()  # the data term only: weight decay is left out
    top_eigenvalues(model, loss_fn, batches, k=3, seed=0).values        # λ_max first
    hessian_trace(model, loss_fn, batches, probes=20, seed=0)           # .value, .standard_error
    rho_sharpness(model, loss_fn, batches, rho=0.1, adaptive=False)    # .worst_case, .average_case
    (d,) = filter_normalised_directions(model, seed=0)
    loss_slice(model, loss_fn, batches, [d], alphas=[-1, -0.5, 0, 0.5, 1]).losses

Every measurement runs the model in eval mode (BatchNorm with its running statistics, no dropout) and leaves its
weights, buffers, modes and gradients exactly as it found them (:mod:`fsam.analysis.measurement`); every random
choice comes from a generator seeded by the caller, so the same seed gives the same numbers. Finished runs are
measured from their folders by :mod:`fsam.analysis.record` (``scripts/sharpness.py``; docs/sharpness.md).
"""

from fsam.analysis.hessian import HessianTrace, TopEigenvalues, hessian_trace, hessian_vector_product, top_eigenvalues
from fsam.analysis.landscape import Slice, filter_normalised_directions, loss_along_line, loss_slice
from fsam.analysis.measurement import mean_loss, measurement_mode, trainable_parameters
from fsam.analysis.perturbation import RhoSharpness, rho_sharpness

__all__ = [
    "HessianTrace",
    "RhoSharpness",
    "Slice",
    "TopEigenvalues",
    "filter_normalised_directions",
    "hessian_trace",
    "hessian_vector_product",
    "loss_along_line",
    "loss_slice",
    "mean_loss",
    "measurement_mode",
    "rho_sharpness",
    "top_eigenvalues",
    "trainable_parameters",
]
