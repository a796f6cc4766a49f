"""Masked-autoencoder reconstruction loss."""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange


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
) -> torch.Tensor:
    """pred, target [B, C, H, W]; mask [B, L] (1 = masked).

    "all": mean squared error over the whole image (as in the paper); "masked": over masked patches only.
    Under channel parallelism pred/target hold this rank's channels only: `sum_over_ranks` adds the
    per-patch squared errors of all ranks and `total_channels` is the full channel count.
    `valid` [B, C, H, W] (bool, under data.nan=mask): the mean is taken over valid pixels only, of the
    global batch when `dp_mean` is given (see `dchag.tasks.step.masked_mean`).
    """
    channels = total_channels or pred.shape[1]
    err = (pred.float() - target.float()) ** 2
    if valid is not None:
        return _masked_mae_loss(err, mask, patch, loss_on, valid, sum_over_ranks, dp_mean)
    sse = rearrange(err, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch, p2=patch).sum(-1)  # [B, L]
    if sum_over_ranks is not None:
        sse = sum_over_ranks(sse)
    per_patch = sse / (channels * patch * patch)  # [B, L] mean over every channel and pixel of a patch
    if loss_on == "all":
        return per_patch.mean()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def _masked_mae_loss(err, mask, patch: int, loss_on: str, valid, sum_over_ranks, dp_mean=None) -> torch.Tensor:
    """Squared error [B, C, H, W] averaged over the valid pixels (of masked patches, for "masked"): per
    patch the sum over valid pixels and their count, added up over ranks, then sum / count."""
    per = "b c (h p1) (w p2) -> b (h w) (c p1 p2)"
    sse = rearrange(torch.where(valid, err, 0.0), per, p1=patch, p2=patch).sum(-1)  # [B, L]
    count = rearrange(valid.to(err.dtype), per, p1=patch, p2=patch).sum(-1)  # [B, L]
    both = torch.stack([sse, count])  # [2, B, L]: one reduction for both sums
    if sum_over_ranks is not None:
        both = sum_over_ranks(both)
    sse, count = both[0], both[1]
    if loss_on == "masked":
        sse, count = sse * mask, count * mask
    total = count.sum()
    if dp_mean is not None:  # the global batch's count (see dchag.tasks.step.masked_mean)
        total = dp_mean(total)
    return sse.sum() / total.clamp(min=1)
