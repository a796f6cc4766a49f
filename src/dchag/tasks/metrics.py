"""Forecast skill as WeatherBench defines it: latitude-weighted RMSE and anomaly correlation (ACC).

All functions take fields [B, C, H, W] in physical units and latitude weights [H] (cos latitude,
normalised to mean 1) and return per-sample, per-channel terms [B, C]; the evaluation averages them over
all forecast times (RMSE: the square root of the mean weighted MSE).
"""

from __future__ import annotations

import torch


def weighted_mse(
    pred: torch.Tensor, truth: torch.Tensor, lat_weights: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Latitude-weighted spatial mean of the squared error: [B, C]. `valid` [B, C, H, W] (bool,
    data.nan=mask): the weighted mean over valid pixels only (NaN where a field has none)."""
    err = (pred.double() - truth.double()) ** 2
    if valid is None:
        return (err * lat_weights.double()[None, None, :, None]).mean(dim=(2, 3))
    w = lat_weights.double()[None, None, :, None] * valid.double()  # [B, C, H, W]
    return (torch.where(valid, err, 0.0) * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))


def anomaly_correlation(
    pred: torch.Tensor,
    truth: torch.Tensor,
    climatology: torch.Tensor,
    lat_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ACC of forecast and truth anomalies against `climatology` [C, H, W]: [B, C] (in [-1, 1]).
    `valid` [B, C, H, W] (bool, data.nan=mask): over valid pixels only."""
    w = lat_weights.double()[None, None, :, None]
    f = pred.double() - climatology.double()[None]
    o = truth.double() - climatology.double()[None]
    if valid is not None:
        w = w * valid.double()
        f, o = torch.where(valid, f, 0.0), torch.where(valid, o, 0.0)
    num = (w * f * o).sum(dim=(2, 3))
    den = ((w * f * f).sum(dim=(2, 3)) * (w * o * o).sum(dim=(2, 3))).sqrt()
    return num / den.clamp(min=1e-300)
