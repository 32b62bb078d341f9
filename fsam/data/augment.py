"""The CIFAR augmentation recipe as batched tensor math on the device.

Random crop from the zero-padded image, horizontal flip, normalisation, then Cutout: the released F-SAM recipe
(torchvision's ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``, ``Normalize`` and a Cutout that zeroes a square
after normalisation), done for a whole batch with one gather instead of per image on the CPU. The random numbers
are drawn apart from their use (:func:`draw_augmentation`), so a loader can draw an epoch's worth at once from its
own generator and any batch of the epoch can be rebuilt exactly.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fsam.data.specs import AugmentSpec

DRAW_ROWS = ("offset_y", "offset_x", "flip", "cutout", "centre_y", "centre_x")


def draw_augmentation(spec: AugmentSpec, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """The random choices for ``n`` images of ``height`` x ``width`` pixels: int64 [6, n], rows as ``DRAW_ROWS``.

    ``offset_y``, ``offset_x``: top-left corner of the crop window in the padded image, in [0, 2 * padding]
    (``padding`` is the unshifted image). ``flip``, ``cutout``: 1 for the images that get it. ``centre_y``,
    ``centre_x``: centre of the Cutout square, anywhere in the image, so squares near the border are clipped.
    A part that ``spec`` turns off gets its neutral value. The same number of values is drawn whatever ``spec``
    says, so switching one part off leaves the draws of the others (and of anything drawn after) unchanged.
    """
    offsets = torch.randint(0, 2 * spec.padding + 1, (2, n), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator)
    cutout = (torch.rand(n, generator=generator) < spec.cutout_prob).long()
    centre_y = torch.randint(0, height, (n,), generator=generator)
    centre_x = torch.randint(0, width, (n,), generator=generator)
    if not spec.crop:
        offsets.fill_(spec.padding)
    if not spec.flip:
        flip.zero_()
    if not spec.cutout or spec.cutout_size == 0:
        cutout.zero_()
    return torch.stack([offsets[0], offsets[1], flip, cutout, centre_y, centre_x])


def augment(
    images: torch.Tensor, draws: torch.Tensor, spec: AugmentSpec, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Augment a batch: uint8 ``images`` [B, C, H, W] -> float32 [B, C, H, W] on the same device.

    ``draws``: int64 [6, B] from :func:`draw_augmentation`; ``mean``, ``std``: per-channel statistics of the
    [0, 1]-scaled pixels, broadcastable to [1, C, 1, 1]. The parts ``spec`` turns off are skipped whatever the
    draws say. Pixel values are scaled to [0, 1] (and normalised when ``spec.normalize``); the crop's padding is
    black before normalisation, the Cutout square is 0 after it.
    """
    draws = draws.to(images.device)
    offset_y, offset_x, flip, cutout, centre_y, centre_x = draws
    if spec.crop or spec.flip:
        images = _crop_and_flip(
            images,
            padding=spec.padding if spec.crop else 0,
            offset_y=offset_y if spec.crop else torch.zeros_like(offset_y),
            offset_x=offset_x if spec.crop else torch.zeros_like(offset_x),
            flip=flip.bool() if spec.flip else torch.zeros_like(flip, dtype=torch.bool),
        )
    inputs = images.float() / 255.0
    if spec.normalize:
        inputs = (inputs - mean.to(inputs.device)) / std.to(inputs.device)
    if spec.cutout and spec.cutout_size > 0:
        inputs = _cutout(inputs, cutout.bool(), centre_y, centre_x, spec.cutout_size)
    return inputs


def _crop_and_flip(
    images: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Each image's window of its zero-padded copy, mirrored where ``flip``: one gather for the whole batch.

    The result [B, C, H, W] is a permuted view of a [B, H, W, C] tensor (channels-last strides).
    """
    batch, _, height, width = images.shape
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    rows = offset_y[:, None] + torch.arange(height, device=device)  # [B, H] rows of the padded image
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + offset_x[:, None]  # [B, W]
    which = torch.arange(batch, device=device)[:, None, None]
    # Indices on dims 0, 2 and 3 around a slice: the indexed dims come first, so the result is [B, H, W, C].
    window = images[which, :, rows[:, :, None], columns[:, None, :]]
    return window.permute(0, 3, 1, 2)


def _cutout(
    inputs: torch.Tensor, chosen: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor, size: int
) -> torch.Tensor:
    """Zero, in every channel, the ``size`` x ``size`` square at each chosen image's centre, clipped at the border."""
    _, _, height, width = inputs.shape
    top = centre_y - size // 2
    left = centre_x - size // 2
    rows = torch.arange(height, device=inputs.device)
    columns = torch.arange(width, device=inputs.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size) & chosen[:, None]  # [B, H]
    in_columns = (columns >= left[:, None]) & (columns < left[:, None] + size)  # [B, W]
    hole = in_rows[:, :, None] & in_columns[:, None, :]  # [B, H, W]
    return inputs.masked_fill(hole[:, None], 0.0)
