"""Forecasting losses: squared error weighted by cos(latitude), so each grid cell counts by its area."""

from __future__ import annotations

import torch


def lat_weighted_mse(pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor) -> torch.Tensor:
    """pred, target [B, C, H, W]; lat_weights [H] with mean 1 -> scalar."""
    err = (pred.float() - target.float()) ** 2
    return (err * lat_weights[None, None, :, None]).mean()


def lat_weighted_rmse(pred: torch.Tensor, target: torch.Tensor, lat_weights: torch.Tensor) -> torch.Tensor:
    """Per-channel latitude-weighted RMSE, averaged over the batch: [C]."""
    err = (pred.float() - target.float()) ** 2 * lat_weights[None, None, :, None]
    return err.mean(dim=(2, 3)).sqrt().mean(dim=0)
