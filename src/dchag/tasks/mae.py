"""Masked-autoencoder reconstruction loss."""

from __future__ import annotations

from typing import Callable

import torch

from dchag.tasks.patch_error import patch_counts, patch_sse, patchify


def mask_noise_for_step(cfg, step: int, global_batch: int, num_patches: int) -> torch.Tensor:
    """MAE mask noise [B_global, L] from (seed, step): every rank draws the whole batch's noise and keeps
    its data-parallel rows, so TP peers agree, DP ranks differ, and the layout changes nothing."""
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 4099)
    return torch.rand(global_batch, num_patches, generator=g)


def mae_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    loss_on: str = "all",
    *,
    total_channels: int | None = None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
    dp_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    consume: bool = False,
    sum_over_strips: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """pred: the decoder's patches [B, L, C*p*p] (what training passes) or an image [B, C, H, W];
    target [B, C, H, W]; mask [B, L] (1 = masked).

    "all": mean squared error over the whole image (as in the paper); "masked": over masked patches only.
    Under channel parallelism pred/target hold this rank's channels only: the rank sums its squared
    errors to a scalar, `sum_over_ranks` adds the ranks' scalars and `total_channels` is the full channel
    count. `valid` [B, C, H, W] (bool, under data.nan=mask): the mean is taken over valid pixels only, of
    the global batch when `dp_mean` is given (see `dchag.tasks.step.masked_mean`). The squared error never
    exists at image size (`dchag.tasks.patch_error`); with `consume` (training: nobody reads the
    prediction afterwards) it is built in the prediction's own storage.
    Under context parallelism pred/target/mask hold one strip of the image's patches: `sum_over_strips`
    adds the strips' sums (and the patch counts divided by) over the CP group.
    """
    channels = total_channels or target.shape[1]
    if pred.dim() == 4:  # an image: its patch-layout copy is ours to consume; where patchify returns a view
        # instead (e.g. C = 1 and p = 1) that is the caller's tensor, which backward must not overwrite
        image, pred = pred, patchify(pred, patch)
        consume = pred.untyped_storage().data_ptr() != image.untyped_storage().data_ptr()
    sse = patch_sse(pred, target, patch, valid, consume)  # [B, L]: this rank's channels
    weight = mask if loss_on == "masked" else None  # [B, L] or every patch alike
    if valid is not None:  # divide by the valid pixels counted (of masked patches, for "masked")
        count = patch_counts(valid, patch)  # [B, L]
        sums = torch.stack([_weighted_sum(sse, weight), _weighted_sum(count, weight)])  # one reduction
        if sum_over_ranks is not None:
            sums = sum_over_ranks(sums)
        if sum_over_strips is not None:
            sums = sum_over_strips(sums)
        total = sums[1]
        if dp_mean is not None:  # the global batch's count (see dchag.tasks.step.masked_mean)
            total = dp_mean(total)
        return sums[0] / total.clamp(min=1)
    total_sse = _weighted_sum(sse, weight)  # a scalar: all that crosses the TP group
    if sum_over_ranks is not None:
        total_sse = sum_over_ranks(total_sse)
    per_pixel = total_sse / (channels * patch * patch)  # sum over patches of each patch's mean error
    if sum_over_strips is not None:  # the sum and the patches counted over the whole image, in one reduction
        counted = sse.new_tensor(float(sse.numel())) if loss_on == "all" else mask.sum().to(sse.dtype)
        per_pixel, counted = sum_over_strips(torch.stack([per_pixel, counted]))
        return per_pixel / counted.clamp(min=1)
    if loss_on == "all":
        return per_pixel / sse.numel()
    return per_pixel / mask.sum().clamp(min=1)


def _weighted_sum(per_patch: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return per_patch.sum() if weight is None else (per_patch * weight).sum()
