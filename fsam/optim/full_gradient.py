"""The exact full-batch gradient over a training set, and how well an estimate of it (F-SAM's EMA) agrees.

Used by the paper's Figure-1 analysis (``SAM(perturbation="full" | "noise")``) and by the engine's logging of
F-SAM's EMA against the full gradient (``trainer.full_grad_analysis_every``)::

    full = full_gradient(model, data.train_in_order.iterate(0), loss_fn, params=ordered_params)
    optimizer.set_full_gradient(full)
    agreement(optimizer.ema_estimate(), full)    # {"cosine": ..., "relative_error": ...}

Cost: one forward and one backward pass over every training example, i.e. ``N / B`` minibatch passes; refreshed
every K steps that is ``(N / B) / K`` extra forward+backward passes per step on average (a SAM step does 2).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from fsam.optim.step import disable_running_stats


def full_gradient(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    params: Iterable[torch.Tensor] | None = None,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The gradient of the mean loss over every example in ``batches``, one tensor per parameter (float32, or
    float64 for float64 parameters; zeros for a parameter the loss does not reach).

    Each batch's mean loss is weighted by its size, so for a model whose examples do not interact (no BatchNorm)
    the result is exactly the mean of the per-example gradients, whatever the batching.

    What it is the gradient of, and why:

    * BatchNorm in **training mode** (batch statistics), its running statistics left untouched. The training
      step's minibatch gradient g is taken in training mode; the full gradient the analysis compares it with must
      be the expectation of the same function, i.e. the size-weighted mean of training-mode minibatch gradients
      over a partition of the training set (so pass batches of the training batch size). Eval mode would
      differentiate another function, normalised by running averages that lag behind the weights.
    * The data as given: the engine passes the training split **without augmentation**, in order, with the
      training labels (noisy labels included), so f is the gradient of the training loss on the stored training
      set and is the same whenever it is computed at the same weights. Augmentation is part of what makes g
      differ from f, i.e. of the "noise" component, not of f.
    * Nothing of the training state changes: the parameters' ``.grad`` (the gradients come from
      ``torch.autograd.grad``), BatchNorm's running statistics, the model's train/eval mode and the random state
      (forked around the passes, so dropout draws nothing from the training's stream) are as before. Training
      with and without this call in between is bit-identical.
    * Full precision: no autocast, whatever ``trainer.amp`` the training uses (f is a reference to compare with).

    Args:
        model: the network, not wrapped in DDP (the sums are reduced by ``all_reduce_sum`` instead).
        batches: ``(inputs [B, ...], targets [B])`` pairs covering the examples once.
        loss_fn: ``loss_fn(logits, targets) -> 0-dim mean loss`` (the training loss).
        params: the parameters to differentiate, in the order wanted back (default: the model's trainable
            parameters); pass an optimizer's ``[p for g in opt.param_groups for p in g["params"]]`` for
            :meth:`fsam.optim.SAM.set_full_gradient`.
        all_reduce_sum: DDP: sums a tensor over processes in place and returns it, so each process gives the
            gradient over the union of their shards.

    Raises:
        ValueError: ``batches`` held no example.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    sums = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32) for p in params]
    count = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    was_training = model.training
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    model.train()
    try:
        with torch.random.fork_rng(devices=cuda_devices), disable_running_stats(model), torch.enable_grad():
            for inputs, targets in batches:
                size = inputs.shape[0]
                loss = loss_fn(model(inputs), targets) * size
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for total, grad in zip(sums, grads):
                    if grad is not None:
                        total.add_(grad)
                count += size
    finally:
        model.train(was_training)
    if all_reduce_sum is not None:
        sums = [all_reduce_sum(total) for total in sums]
        count = all_reduce_sum(count)
    if float(count) == 0:
        raise ValueError("full_gradient() got no example: the batches were empty")
    return [total.div_(count.to(total.device, total.dtype)) for total in sums]


@torch.no_grad()
def agreement(estimate: Iterable[torch.Tensor | None], full: Iterable[torch.Tensor]) -> dict[str, float]:
    """How well ``estimate`` (e.g. F-SAM's EMA) matches the full gradient ``full``, over all parameters at once.

    Returns ``cosine`` = e·f / (||e|| ||f||) in [-1, 1] and ``relative_error`` = ||e - f|| / ||f|| (0 is exact),
    computed in float64 over the parameters where ``estimate`` has a tensor (None entries are left out of both).
    """
    pairs = [(e.double(), f.to(e.device).double()) for e, f in zip(estimate, full) if e is not None]
    if not pairs:
        raise ValueError("agreement() got no estimate: every entry was None (has the optimizer taken a step?)")
    dot = sum(float(torch.sum(e * f)) for e, f in pairs)
    estimate_norm = sum(float(torch.sum(e * e)) for e, _ in pairs) ** 0.5
    full_norm = sum(float(torch.sum(f * f)) for _, f in pairs) ** 0.5
    difference = sum(float(torch.sum((e - f) ** 2)) for e, f in pairs) ** 0.5
    tiny = 1e-300  # a zero vector gives cosine 0 and, against a zero full gradient, an infinite relative error
    return {
        "cosine": max(-1.0, min(1.0, dot / max(estimate_norm * full_norm, tiny))),
        "relative_error": difference / full_norm if full_norm > 0 else float("inf"),
    }
