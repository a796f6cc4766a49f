"""One model evaluation and its loss, shared by training, parity checks and benchmarks."""

from __future__ import annotations

import torch

from dchag.tasks.forecast import lat_weighted_mse, masked_sse
from dchag.tasks.mae import mae_loss


def compute_loss(model, batch: dict, cfg, *, lat_weights=None, mask_noise=None, channel_shard=None):
    """Returns (loss, ModelOutput) for the configured task.

    `batch` holds x [B, C, H, W] (and, for forecasting, y [B, C_out, H, W] and lead_hours [B]).
    `channel_shard` (from a `ParallelPlan`) is set when x holds only this rank's channels: the MAE model
    then reconstructs only those, and the loss sums the per-patch errors over ranks.
    """
    if cfg.train.task == "forecast":
        out = model(batch["x"], batch["lead_hours"])
        weights = lat_weights if lat_weights is not None else torch.ones(batch["y"].shape[2], device=batch["y"].device)
        valid = batch.get("y_valid")  # [B, C_out, H, W] under data.nan=mask: NaN pixels leave the loss
        if channel_shard is None:
            return lat_weighted_mse(out.pred, batch["y"], weights, valid), out
        # this rank's output channels [B, C_out_r, H, W] (maybe none): its weighted sums, added over ranks
        sse, weight = masked_sse((out.pred.float() - batch["y"].float()) ** 2, weights, valid)
        if valid is not None:  # divide by the valid weight of the whole prediction
            sums = channel_shard.sum_over_ranks(torch.stack([sse, weight]))
            return sums[0] / sums[1].clamp(min=1e-12), out
        # ... or, as lat_weighted_mse's mean does, by the element count of the whole prediction
        b, _, h, w = batch["y"].shape
        return channel_shard.sum_over_ranks(sse) / (b * channel_shard.total_out * h * w), out
    out = model(batch["x"], mask_noise=mask_noise)
    patch, loss_on = cfg.model.patch_size, cfg.train.mae_loss_on
    valid = batch.get("x_valid")  # [B, C, H, W] under data.nan=mask
    if channel_shard is None:
        return mae_loss(out.pred, batch["x"], out.mask, patch, loss_on, valid=valid), out
    loss = mae_loss(
        out.pred,  # [B, C_r, H, W]: a channel-parallel model predicts only this rank's channels
        batch["x"],
        out.mask,
        patch,
        loss_on,
        total_channels=channel_shard.total,
        sum_over_ranks=channel_shard.sum_over_ranks,
        valid=valid,
    )
    return loss, out
