"""Forecasting losses: squared error weighted by cos(latitude), so each grid cell counts by its area."""

from __future__ import annotations

import torch


def lat_weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """pred, target [B, C, H, W]; lat_weights [H] with mean 1 -> scalar. `valid` [B, C, H, W] (bool, under
    data.nan=mask): the weighted mean over valid pixels only, sum(w e v) / sum(w v)."""
    err = (pred.float() - target.float()) ** 2
    if valid is None:
        return (err * lat_weights[None, None, :, None]).mean()
    sse, weight = masked_sse(err, lat_weights, valid)
    return sse / weight.clamp(min=1e-12)


def masked_sse(err: torch.Tensor, lat_weights: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of w * err over valid pixels, sum of w over valid pixels) of err [B, C, H, W]: the two sums a
    masked weighted mean needs, which tensor-parallel ranks add up over their channels."""
    w = lat_weights[None, None, :, None] * valid.to(err.dtype)  # [B, C, H, W]
    return torch.where(valid, err, 0.0).mul(w).sum(), w.sum()


def lat_weighted_rmse(pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor) -> torch.Tensor:
    """Per-channel latitude-weighted RMSE, averaged over the batch: [C]."""
    err = (pred.float() - target.float()) ** 2 * lat_weights[None, None, :, None]
    return err.mean(dim=(2, 3)).sqrt().mean(dim=0)
