"""One model evaluation and its loss, shared by training, parity checks and benchmarks."""

from __future__ import annotations

from typing import Callable

import torch

from dchag.tasks.forecast import lat_weighted_mse, masked_sse
from dchag.tasks.mae import mae_loss
from dchag.tasks.rollout import RolloutOutput, input_positions, rollout


def masked_mean(sse: torch.Tensor, weight: torch.Tensor, dp_mean: Callable | None = None) -> torch.Tensor:
    """sse / weight of a masked loss. Under data parallelism (`dp_mean`: the mean over DP ranks, no
    gradient) the weight is the ranks' mean weight: the mean over ranks of these losses is then the masked
    mean over the global batch, and the gradients summed over ranks are exactly one device's, however the
    valid pixels are spread over the ranks' samples."""
    if dp_mean is not None:
        weight = dp_mean(weight)
    return sse / weight.clamp(min=1e-12)


def forecast_loss(pred, y, weights, valid=None, channel_shard=None, dp_mean=None, strip=None) -> torch.Tensor:
    """The latitude-weighted MSE of one forecast pred [B, C_out(_r), H(_j), W] against y (NaN-masked where
    `valid`); under channel parallelism the rank's weighted sums are added over ranks first, under context
    parallelism (`strip`: a `StripLayout`; pred, y and weights hold its rows) over the strips too."""
    if channel_shard is None and valid is None and strip is None:
        return lat_weighted_mse(pred, y, weights)
    # this rank's output channels [B, C_out_r, H, W] (maybe none): its weighted sums, added over ranks
    sse, weight = masked_sse((pred.float() - y.float()) ** 2, weights, valid)
    shards = [s for s in (channel_shard, strip) if s is not None]
    if valid is not None:  # divide by the valid weight of the whole prediction
        sums = torch.stack([sse, weight])
        for shard in shards:
            sums = shard.sum_over_ranks(sums)
        return masked_mean(sums[0], sums[1], dp_mean)
    # ... or, as lat_weighted_mse's mean does, by the element count of the whole prediction
    for shard in shards:
        sse = shard.sum_over_ranks(sse)
    b, c, h, w = y.shape
    c = channel_shard.total_out if channel_shard is not None else c
    h = strip.height if strip is not None else h
    return sse / (b * c * h * w)


def compute_loss(
    model,
    batch: dict,
    cfg,
    *,
    lat_weights=None,
    mask_noise=None,
    channel_shard=None,
    dp_mean=None,
    keep_output=True,
    strip=None,
):
    """Returns (loss, ModelOutput) for the configured task.

    `batch` holds x [B, C, H, W] (and, for forecasting, y [B, C_out, H, W] and lead_hours [B]).
    `channel_shard` (from a `ParallelPlan`) is set when x holds only this rank's channels: the MAE model
    then reconstructs only those, and the loss sums the per-patch errors over ranks. `dp_mean` (the plan's,
    under data parallelism) makes NaN-masked losses exact over the global batch (`masked_mean`).
    `strip` (the plan's `StripLayout`, under context parallelism): the batch and `lat_weights` hold this
    rank's rows of the image (MAE: `mask_noise` is still the whole image's), and the loss adds the strips'
    sums over the CP group.
    `keep_output=False` (training, which only needs the loss): the MAE loss builds its error in the
    prediction's storage, and the output returned is None.

    `batch["channel_keep"]` [C] (bool, optional; over all channels, also under channel parallelism): a band
    subset (`train.channel_subset`): the model leaves the other channels out of its input, and the loss
    still covers every channel (an MAE reconstructs the left-out bands; a forecast predicts every target).

    Rollout training (`train.rollout_steps` K > 1): y [B, K, C_out, H, W] holds the targets at K multiples
    of the lead and forcings [B, K-1, C, H, W] the inputs at the intermediate valid times; the loss is the
    mean of the K steps' losses, back-propagated through the rollout, and the output's pred is
    [B, K, C_out, H, W].
    """
    keep = batch.get("channel_keep")  # [C] or None
    if cfg.train.task == "forecast":
        y, valid = batch["y"], batch.get("y_valid")  # y_valid under data.nan=mask: NaN pixels leave the loss
        weights = lat_weights if lat_weights is not None else torch.ones(y.shape[-2], device=y.device)
        if y.dim() == 4:
            out = model(batch["x"], batch["lead_hours"], channel_keep=keep)
            return forecast_loss(out.pred, y, weights, valid, channel_shard, dp_mean, strip), out
        steps = y.shape[1]
        forcings = batch.get("forcings")  # [B, K-1, C, H, W]
        preds = rollout(
            model,
            batch["x"],
            batch["lead_hours"],
            steps,
            in_out_index=input_positions(cfg.channels, cfg.out_channels, channel_shard),
            forcings=[forcings[:, k] for k in range(steps - 1)] if forcings is not None else None,
            checkpointing=cfg.train.rollout_checkpointing,
            channel_keep=keep,
        )
        losses = [
            forecast_loss(
                pred, y[:, k], weights, valid[:, k] if valid is not None else None, channel_shard, dp_mean, strip
            )
            for k, pred in enumerate(preds)
        ]
        return torch.stack(losses).mean(), RolloutOutput(torch.stack(preds, 1))
    out = model(batch["x"], mask_noise=mask_noise, channel_keep=keep)
    patch, loss_on = cfg.model.patch_size, cfg.train.mae_loss_on
    valid = batch.get("x_valid")  # [B, C, H, W] under data.nan=mask
    strips = strip.sum_over_ranks if strip is not None else None
    if channel_shard is None:
        loss = mae_loss(
            out.patches,
            batch["x"],
            out.mask,
            patch,
            loss_on,
            valid=valid,
            dp_mean=dp_mean,
            consume=not keep_output,
            sum_over_strips=strips,
        )
        return loss, out if keep_output else None
    loss = mae_loss(
        out.patches,  # [B, L, C_r*p*p]: a channel-parallel model predicts only this rank's channels
        batch["x"],
        out.mask,
        patch,
        loss_on,
        total_channels=channel_shard.total,
        sum_over_ranks=channel_shard.sum_over_ranks,
        valid=valid,
        dp_mean=dp_mean,
        consume=not keep_output,
        sum_over_strips=strips,
    )
    return loss, out if keep_output else None
