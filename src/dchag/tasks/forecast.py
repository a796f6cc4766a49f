"""Forecasting losses and skill: squared error weighted by cos(latitude), so each grid cell counts by its
area. `lat_weighted_mse` is the package's one latitude-weighted MSE: the training loss (a scalar) and the
evaluation's RMSE (per field, `dims=(2, 3)`) both call it."""

from __future__ import annotations

import torch


def lat_weighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    lat_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    dims: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """pred, target [B, C, H, W]; lat_weights [H] with mean 1 -> the weighted mean of the squared error
    over `dims` (all: a scalar, the loss; (2, 3): per field [B, C], the evaluation's terms). `valid`
    [B, C, H, W] (bool, under data.nan=mask): over valid pixels only, sum(w e v) / sum(w v) (0 where a
    field has none). Computed in float32, or in float64 when an input is float64 (evaluation)."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), lat_weights.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    err = (pred.to(dtype) - target.to(dtype)) ** 2
    if valid is None:
        return (err * lat_weights.to(dtype)[None, None, :, None]).mean(dim=dims)
    sse, weight = masked_sse(err, lat_weights, valid, dims)
    return sse / weight.clamp(min=1e-12)


def masked_sse(
    err: torch.Tensor, lat_weights: torch.Tensor, valid: torch.Tensor | None, dims: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of w * err, sum of w) over `dims` (all when None) of err [B, C, H, W], over valid pixels only
    when `valid` is given: the two sums a weighted mean needs, which tensor-parallel ranks add up over
    their channels before dividing."""
    w = lat_weights.to(err.dtype)[None, None, :, None]
    if valid is None:
        return (err * w).sum(dim=dims), w.expand_as(err).sum(dim=dims)
    w = w * valid.to(err.dtype)  # [B, C, H, W]
    return torch.where(valid, err, 0.0).mul(w).sum(dim=dims), w.sum(dim=dims)
