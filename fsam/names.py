"""The names a config may choose from, importable without torch.

The config schema checks a command line against these before anything heavy is imported, so a typo costs a
second, not the several seconds torch takes to load. Each package that implements the names re-exports them
(``fsam.optim.METHODS``, ...); ``tests/test_models.py`` checks that ``MODEL_NAMES`` matches the model factory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One training method: what the config, the factory, the run identity and the reports know of it.

    ``reads``: the ``optimizer.*`` keys it reads beyond its base optimizer's (the others cannot change what it
    computes, so they stay out of its run identity). ``rho``: the radius a config that leaves ``optimizer.rho``
    null gets, so ``optimizer=sam`` and ``optimizer.name=sam`` are one setting whatever the other group files say.
    """

    name: str
    label: str
    reads: tuple[str, ...]
    rho: float | None
    adaptive: bool = False


# rho: SAM 0.1 (the middle of the 0.05-0.2 used on CIFAR), F-SAM 0.2 (the authors' released recipe), ASAM and
# F-ASAM 1.0 (ASAM's radius is on another scale: 0.5-2.0).
METHOD_REGISTRY = {method.name: method for method in (
    Method("sgd", "SGD", (), None),
    Method("sam", "SAM", ("rho", "perturbation", "full_grad_every"), 0.1),
    Method("asam", "ASAM", ("rho", "eta"), 1.0, adaptive=True),
    Method("fsam", "F-SAM", ("rho", "sigma", "lmbda", "ema_order"), 0.2),
    Method("fasam", "F-ASAM", ("rho", "sigma", "lmbda", "ema_order", "eta"), 1.0, adaptive=True),
)}
METHODS = tuple(METHOD_REGISTRY)
# SAM's ascent direction for the paper's Figure-1 analysis: the minibatch gradient g (ordinary SAM), the full-batch
# gradient alone, or the part of g orthogonal to it (docs/algorithm.md, "The perturbation's two parts").
PERTURBATIONS = ("minibatch", "full", "noise")
BASE_OPTIMIZERS = ("sgd", "adamw")
PRECISION_MODES = ("bf16", "fp16", "off")
# fsam.models.available_models(): the CIFAR-stem models written here and the short names of timm models
MODEL_NAMES = (
    "deit_small", "mlp", "pyramidnet110", "resnet18", "resnet34", "resnet50", "resnet50_imagenet", "vgg16_bn",
    "vgg16_bn_release", "vit_cifar", "vit_small", "wrn16_8", "wrn16_8_release", "wrn28_10", "wrn28_10_release",
)
TIMM_PREFIX = "timm:"
# The keyword arguments each model builder takes and their defaults, so a run's identity completes
# ``model.kwargs`` without building the model (tests/test_runfolder.py checks them against the builders).
# init: "ours" or "release" (the F-SAM release's initialisation); the *_release networks start from the release's.
MODEL_DEFAULTS = {
    "resnet18": {"init": "ours"},
    "resnet34": {"init": "ours"},
    "resnet50": {"init": "ours"},
    "pyramidnet110": {"depth": 110, "alpha": 270.0, "bottleneck": True, "init": "ours"},
    "wrn28_10": {"drop_rate": 0.0, "init": "ours"},
    "wrn16_8": {"drop_rate": 0.0, "init": "ours"},
    "wrn28_10_release": {"drop_rate": 0.0, "init": "release"},
    "wrn16_8_release": {"drop_rate": 0.0, "init": "release"},
    "vgg16_bn": {"init": "ours"},
    "vgg16_bn_release": {"init": "release"},
    "vit_cifar": {"patch_size": 4},
    "mlp": {"width": 512, "depth": 2, "batch_norm": True, "init": "ours"},
}
