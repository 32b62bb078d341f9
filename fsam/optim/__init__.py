"""The SAM family as a library: drop ``SAM`` / ``FSAM`` into any training loop, or use ``train_step``.

    from fsam.optim import FSAM
    optimizer = FSAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.6, lr=0.05, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step()                 # w + e, gradients zeroed
    loss_fn(model(x), y).backward()        # at the perturbed weights
    optimizer.second_step()                # restore w, base optimizer steps
"""

from fsam.optim.factory import BASE_OPTIMIZERS, METHODS, PERTURBATIONS, create_optimizer, param_groups
from fsam.optim.full_gradient import agreement, full_gradient
from fsam.optim.sam import FSAM, SAM
from fsam.optim.step import PRECISION_MODES, Precision, StepOutput, disable_running_stats, train_step

__all__ = [
    "BASE_OPTIMIZERS",
    "FSAM",
    "METHODS",
    "PERTURBATIONS",
    "PRECISION_MODES",
    "Precision",
    "SAM",
    "StepOutput",
    "agreement",
    "create_optimizer",
    "disable_running_stats",
    "full_gradient",
    "param_groups",
    "train_step",
]
