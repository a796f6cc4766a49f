"""One model evaluation and its loss, shared by training, parity checks and benchmarks."""

from __future__ import annotations

from typing import Callable

import torch

from dchag.tasks.forecast import lat_weighted_mse, masked_sse
from dchag.tasks.mae import mae_loss


def masked_mean(sse: torch.Tensor, weight: torch.Tensor, dp_mean: Callable | None = None) -> torch.Tensor:
    """sse / weight of a masked loss. Under data parallelism (`dp_mean`: the mean over DP ranks, no
    gradient) the weight is the ranks' mean weight: the mean over ranks of these losses is then the masked
    mean over the global batch, and the gradients summed over ranks are exactly one device's, however the
    valid pixels are spread over the ranks' samples."""
    if dp_mean is not None:
        weight = dp_mean(weight)
    return sse / weight.clamp(min=1e-12)


def compute_loss(model, batch: dict, cfg, *, lat_weights=None, mask_noise=None, channel_shard=None, dp_mean=None):
    """Returns (loss, ModelOutput) for the configured task.

    `batch` holds x [B, C, H, W] (and, for forecasting, y [B, C_out, H, W] and lead_hours [B]).
    `channel_shard` (from a `ParallelPlan`) is set when x holds only this rank's channels: the MAE model
    then reconstructs only those, and the loss sums the per-patch errors over ranks. `dp_mean` (the plan's,
    under data parallelism) makes NaN-masked losses exact over the global batch (`masked_mean`).
    """
    if cfg.train.task == "forecast":
        out = model(batch["x"], batch["lead_hours"])
        weights = lat_weights if lat_weights is not None else torch.ones(batch["y"].shape[2], device=batch["y"].device)
        valid = batch.get("y_valid")  # [B, C_out, H, W] under data.nan=mask: NaN pixels leave the loss
        if channel_shard is None and valid is None:
            return lat_weighted_mse(out.pred, batch["y"], weights), out
        # this rank's output channels [B, C_out_r, H, W] (maybe none): its weighted sums, added over ranks
        sse, weight = masked_sse((out.pred.float() - batch["y"].float()) ** 2, weights, valid)
        if valid is not None:  # divide by the valid weight of the whole prediction
            sums = torch.stack([sse, weight])
            if channel_shard is not None:
                sums = channel_shard.sum_over_ranks(sums)
            return masked_mean(sums[0], sums[1], dp_mean), out
        # ... or, as lat_weighted_mse's mean does, by the element count of the whole prediction
        b, _, h, w = batch["y"].shape
        return channel_shard.sum_over_ranks(sse) / (b * channel_shard.total_out * h * w), out
    out = model(batch["x"], mask_noise=mask_noise)
    patch, loss_on = cfg.model.patch_size, cfg.train.mae_loss_on
    valid = batch.get("x_valid")  # [B, C, H, W] under data.nan=mask
    if channel_shard is None:
        return mae_loss(out.pred, batch["x"], out.mask, patch, loss_on, valid=valid, dp_mean=dp_mean), out
    loss = mae_loss(
        out.pred,  # [B, C_r, H, W]: a channel-parallel model predicts only this rank's channels
        batch["x"],
        out.mask,
        patch,
        loss_on,
        total_channels=channel_shard.total,
        sum_over_ranks=channel_shard.sum_over_ranks,
        valid=valid,
        dp_mean=dp_mean,
    )
    return loss, out
