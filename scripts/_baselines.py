"""Re-creations of how the authors' release and public SAM code do things, for the benchmarks to measure against.

Written here from a description of that code, not copied from it: per-parameter Python loops with fresh
temporaries, ``p.data`` swaps to restore the weights, batch-norm statistics frozen by zeroing each layer's momentum,
a host sync per step for the loss, per-image PIL transforms in a torch DataLoader, float32 throughout.
Used by ``bench_optim.py`` (the optimizer alone) and ``bench_train.py`` (whole steps and the data path).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms


class LoopFSAM(torch.optim.Optimizer):
    """The baseline optimizer: per-parameter loops as in existing SAM/F-SAM code (``fsam=False`` gives plain SAM)."""

    def __init__(self, params, rho, sigma, lmbda, fsam, **base_kwargs):
        super().__init__(params, dict(rho=rho, sigma=sigma, lmbda=lmbda))
        self.fsam = fsam
        self.base_optimizer = torch.optim.SGD(self.param_groups, foreach=False, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not self.fsam:
                    continue
                grad = p.grad.clone()
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = grad
                else:
                    p.grad -= state["momentum"] * group["sigma"]
                    state["momentum"] = state["momentum"] * group["lmbda"] + grad * (1 - group["lmbda"])
        grad_norm = torch.norm(
            torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2
        )
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()


def _set_batchnorm_momentum(model: nn.Module, frozen: bool) -> None:
    """The release's way to keep the perturbed pass out of the running statistics: momentum 0 and back."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if frozen:
                module.backup_momentum = module.momentum
                module.momentum = 0
            elif hasattr(module, "backup_momentum"):
                module.momentum = module.backup_momentum


def loop_train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer: LoopFSAM) -> float:
    """One baseline step in float32: clean pass, first step, perturbed pass with frozen BN statistics, second
    step; returns the clean loss as a Python float (a host sync every step, as the release logs it)."""
    criterion = nn.functional.cross_entropy
    _set_batchnorm_momentum(model, frozen=False)
    loss = criterion(model(inputs), targets)
    loss.backward()
    optimizer.first_step()
    optimizer.zero_grad()
    _set_batchnorm_momentum(model, frozen=True)
    criterion(model(inputs), targets).backward()
    optimizer.second_step()
    optimizer.zero_grad()
    return loss.item()


class Cutout:
    """Per image on a [C, H, W] tensor: with probability ``prob`` zero a ``size`` square (clipped at the border)
    centred anywhere in the image, through a fresh numpy mask."""

    def __init__(self, size: int = 16, prob: float = 0.5) -> None:
        self.size, self.prob = size, prob

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if np.random.rand() > self.prob:
            return image
        height, width = image.shape[1:]
        mask = np.ones((height, width), np.float32)
        y, x = np.random.randint(height), np.random.randint(width)
        half = self.size // 2
        mask[max(0, y - half):min(height, y + half), max(0, x - half):min(width, x + half)] = 0.0
        return image * torch.from_numpy(mask).expand_as(image)


class PilCifar(torch.utils.data.Dataset):
    """uint8 images [N, 3, H, W] served one PIL image at a time through the release's torchvision recipe."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # HWC, as PIL wants
        self.labels = labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(images.shape[-1], padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
            Cutout(16, 0.5),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])
