"""Evaluation of the test (or validation) split: mean cross-entropy, top-1 and top-5 accuracy, summed over all processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fsam.engine.distributed import all_reduce_sum
from fsam.optim import Precision


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """int64 [len(ks)]: how many of the B rows of ``logits`` [B, C] have the target among their k best.

    k larger than C counts every row (top-5 of a 3-class problem is 100 %)."""
    largest = min(max(ks), logits.shape[1])
    ranked = logits.topk(largest, dim=1).indices
    hits = ranked == targets.unsqueeze(1)
    return torch.stack([hits[:, : min(k, largest)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, precision: Precision, device: torch.device, split: str = "test"
) -> dict[str, float]:
    """``<split>_loss`` (mean, nats), ``<split>_top1`` and ``<split>_top5`` (percent) over the whole split.

    ``loader.iterate(0)`` yields this process's shard; sums are all-reduced so every process gets the totals.
    The model is left in eval mode.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, examples
    for inputs, targets in loader.iterate(0):
        with precision.autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = topk_correct(logits, targets, (1, 5))
        totals += torch.stack([loss.double(), *correct.double(), torch.tensor(len(targets), device=device).double()])
    loss_sum, top1, top5, count = all_reduce_sum(totals).tolist()
    count = max(count, 1.0)
    return {f"{split}_loss": loss_sum / count, f"{split}_top1": 100.0 * top1 / count,
            f"{split}_top5": 100.0 * top5 / count}


def training_fit(model: nn.Module, data: Any, precision: Precision, device: torch.device) -> dict[str, float]:
    """Top-1 (%) of ``model`` on the training images of ``data`` (a :class:`fsam.data.DataBundle`) in eval mode,
    without augmentation: against the labels it trained on (``train_fit_top1``; with label noise, how much of the
    noise was fitted) and, where label noise changed some, against the clean labels (``train_clean_top1``).
    Nothing for ImageNet, whose training split is not kept in memory."""
    fit = {}
    for key, loader in (("train_fit_top1", data.train_in_order), ("train_clean_top1", data.clean_train_in_order)):
        if loader is not None:
            fit[key] = evaluate(model, loader, precision, device, split="fit")["fit_top1"]
    return fit
