"""One model evaluation and its loss, shared by training, parity checks and benchmarks."""

from __future__ import annotations

import torch

from dchag.tasks.forecast import lat_weighted_mse
from dchag.tasks.mae import mae_loss


def compute_loss(model, batch: dict, cfg, *, lat_weights: torch.Tensor | None = None, mask_noise: torch.Tensor | None = None):
    """Returns (loss, ModelOutput) for the configured task.

    `batch` holds x [B, C, H, W] (and, for forecasting, y [B, C_out, H, W] and lead_hours [B]).
    """
    if cfg.train.task == "forecast":
        out = model(batch["x"], batch["lead_hours"])
        weights = lat_weights if lat_weights is not None else torch.ones(batch["y"].shape[2], device=batch["y"].device)
        return lat_weighted_mse(out.pred, batch["y"], weights), out
    out = model(batch["x"], mask_noise=mask_noise)
    target = batch.get("target", batch["x"])  # channel-parallel runs pass the full image as the target
    return mae_loss(out.pred, target, out.mask, cfg.model.patch_size, cfg.train.mae_loss_on), out
