"""The one training step every method uses: SGD (one pass) and the SAM family (two passes).

``train_step`` owns everything around the optimizer that public SAM code tends to get wrong: mixed precision
(bf16 autocast, or fp16 with a loss scaler and whole-step skipping), gradient accumulation over micro-batches,
BatchNorm statistics (clean pass only) and DDP's gradient synchronisation (the clean pass per replica or
synchronised). A training loop calls it the same way for every method.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fsam.names import PRECISION_MODES
from fsam.optim.sam import SAM



@dataclass
class StepOutput:
    """What one step returns. ``loss`` is the clean pass's mean loss (0-dim, detached, on the device);
    ``logits`` the clean pass's outputs ``[B, C]`` (detached); ``skipped`` is True when an fp16 step found a
    non-finite gradient and changed nothing."""

    loss: torch.Tensor
    logits: torch.Tensor
    skipped: bool = False


class Precision:
    """Autocast and loss scaling for one device.

    Args:
        mode: "bf16" (autocast to bfloat16, no scaler), "fp16" (autocast to float16 with a
            ``torch.amp.GradScaler``) or "off" (float32).
        device: the device the model runs on.
    """

    def __init__(self, mode: str = "off", device: torch.device | str = "cpu") -> None:
        if mode not in PRECISION_MODES:
            raise ValueError(f"precision mode {mode!r} is not allowed: use one of {', '.join(PRECISION_MODES)}")
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers normalise with batch statistics but leave their running statistics (and
    ``num_batches_tracked``) as they were before this block. Used for the perturbed pass.

    The statistics are saved and copied back into the same storage afterwards, rather than switched off with
    ``track_running_stats``: under ``torch.compile`` a module attribute that changes between the two passes
    fails the compiled graph's guards, so the model would be compiled twice and checked against both graphs at
    every pass. Saving and restoring are one foreach copy each per dtype.
    """
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for statistic in (module.running_mean, module.running_var, module.num_batches_tracked):
                if statistic is not None:
                    by_kind[(statistic.device, statistic.dtype)].append(statistic)
    saved = {kind: [torch.empty_like(s) for s in statistics] for kind, statistics in by_kind.items()}
    with torch.no_grad():
        for kind, statistics in by_kind.items():
            torch._foreach_copy_(saved[kind], statistics)
    try:
        yield
    finally:
        with torch.no_grad():
            for kind, statistics in by_kind.items():
                torch._foreach_copy_(statistics, saved[kind])


def _accumulate(
    model: nn.Module,
    chunks: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: Precision,
    synchronise: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward over the micro-batches, gradients summed so they equal one big batch's.

    With DDP, gradients are all-reduced on the last micro-batch only, and on none when ``synchronise`` is
    False (each replica keeps its own gradient).
    """
    total = sum(x.shape[0] for x, _ in chunks)
    can_skip_sync = hasattr(model, "no_sync")
    loss_sum = None
    logits = []
    for index, (inputs, targets) in enumerate(chunks):
        last = index == len(chunks) - 1
        sync_here = synchronise and last
        with model.no_sync() if can_skip_sync and not sync_here else nullcontext():
            with precision.autocast():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets) * (inputs.shape[0] / total)
            scaled = precision.scaler.scale(loss) if precision.scaler is not None else loss
            scaled.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        logits.append(outputs.detach())
    return loss_sum, logits


def _split(inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches} is not allowed: it must be >= 1")
    if micro_batches > inputs.shape[0]:
        raise ValueError(
            f"micro_batches={micro_batches} is larger than the batch ({inputs.shape[0]} examples): use at most "
            "one micro-batch per example"
        )
    return list(zip(inputs.tensor_split(micro_batches), targets.tensor_split(micro_batches)))


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _all_finite(norms: list[torch.Tensor | None]) -> bool:
    """One host synchronisation: are all these gradient norms finite?"""
    present = [n.reshape(()) for n in norms if n is not None]
    if not present:
        return True
    device = present[0].device
    return bool(torch.isfinite(torch.stack([n.to(device) for n in present])).all())


def train_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    precision: Precision | None = None,
    micro_batches: int = 1,
    sync_clean_pass: bool = False,
) -> StepOutput:
    """One optimisation step on one batch, for any method.

    Args:
        model: the network (optionally wrapped in DistributedDataParallel).
        inputs, targets: the whole batch ``[B, ...]``, ``[B]``; split into ``micro_batches`` equal parts whose
            gradients are accumulated, so memory is that of ``B / micro_batches`` examples. ``loss_fn`` must
            return the batch mean; the micro-batch losses are weighted by their size, so the result equals the
            whole batch's (exactly, for a model without BatchNorm).
        loss_fn: ``loss_fn(logits, targets) -> 0-dim mean loss``.
        optimizer: a plain torch optimizer (one pass: SGD, AdamW, ...) or a :class:`SAM` / :class:`FSAM`
            (two passes).
        precision: autocast and loss scaling; default float32. Under fp16, a non-finite gradient in either
            pass skips the whole step (weights, EMA, base optimizer state unchanged) and the scaler backs off.
        sync_clean_pass: DDP only. False (default): each replica perturbs its weights along its own gradient
            (the clean backward runs under ``no_sync``, so SAM communicates once per step; the F-SAM EMA is per
            replica). True: the clean gradients are all-reduced first, every replica takes the same
            perturbation, and the step equals a single process on the combined batch.
    """
    precision = precision or Precision("off")
    scaler = precision.scaler
    chunks = _split(inputs, targets, micro_batches)
    two_pass = isinstance(optimizer, SAM)
    optimizer.zero_grad(set_to_none=True)

    loss, logits = _accumulate(model, chunks, loss_fn, precision, synchronise=sync_clean_pass or not two_pass)
    if not two_pass:
        skipped = False
        if scaler is not None:
            scaler.unscale_(optimizer)
            skipped = not _all_finite([SAM._global_norm(_grads(optimizer))])
        if not skipped:
            optimizer.step()
        if scaler is not None:
            scaler.update()
        return StepOutput(loss, torch.cat(logits), skipped)

    if scaler is not None:
        # The wrapper and its base optimizer count as two optimizers for the scaler, so each pass is unscaled
        # once and update() backs off when either pass overflowed.
        scaler.unscale_(optimizer)
    optimizer.first_step(zero_grad=True, revertible=scaler is not None)
    with disable_running_stats(model):
        _accumulate(model, chunks, loss_fn, precision, synchronise=True)
    skipped = False
    if scaler is not None:
        scaler.unscale_(optimizer.base_optimizer)
        perturbed_norm = SAM._global_norm(_grads(optimizer))
        skipped = not _all_finite([optimizer.last_grad_norm, perturbed_norm])
    if skipped:
        optimizer.revert()
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.second_step()
    if scaler is not None:
        scaler.update()
    return StepOutput(loss, torch.cat(logits), skipped)
