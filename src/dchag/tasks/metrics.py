"""The evaluation's metrics beyond the loss: forecast skill as WeatherBench defines it, and reconstruction
quality as the spectral imaging field does. Tests check them against hand-computed values and PSNR / SAM
also against torchmetrics (tests/test_metric_values.py).

Forecasts: fields [B, C, H, W] in physical units, latitude weights [H] (cos latitude, normalised to mean
1), per-sample, per-channel terms [B, C] that the evaluation averages over all forecast times. The
latitude-weighted MSE is `dchag.tasks.forecast.lat_weighted_mse(..., dims=(2, 3))`, the training loss's
own function (RMSE: the square root of its mean over forecast times).
"""

from __future__ import annotations

import math

import torch


def anomaly_correlation(
    pred: torch.Tensor,
    truth: torch.Tensor,
    climatology: torch.Tensor,
    lat_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ACC of forecast and truth anomalies against `climatology`: [B, C] (in [-1, 1]). `climatology` is one
    field [C, H, W] for all forecasts (static) or one per forecast [B, C, H, W] (by the valid time's day of
    year and hour). `valid` [B, C, H, W] (bool, data.nan=mask): over valid pixels only."""
    w = lat_weights.double()[None, None, :, None]
    clim = climatology.double() if climatology.dim() == 4 else climatology.double()[None]  # [B or 1, C, H, W]
    f = pred.double() - clim
    o = truth.double() - clim
    if valid is not None:
        w = w * valid.double()
        f, o = torch.where(valid, f, 0.0), torch.where(valid, o, 0.0)
    num = (w * f * o).sum(dim=(2, 3))
    den = ((w * f * f).sum(dim=(2, 3)) * (w * o * o).sum(dim=(2, 3))).sqrt()
    return num / den.clamp(min=1e-300)


def psnr_db(mse: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(peak^2 / mse), elementwise (per band: mse, peak [C] -> [C]).
    `peak` is the data range; `dchag eval` takes each band's largest absolute true value over all scored
    pixels. Both are floored at 1e-30 (float64) so a perfect or an empty band stays finite."""
    return 10 * torch.log10(peak.clamp(min=1e-30) ** 2 / mse.clamp(min=1e-30))


def spectral_angle_deg(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Spectral angle between predicted and true spectra, in degrees: pred, truth [C, N] (N pixels) -> [N].
    Brightness does not count (a scaled spectrum has angle 0); a zero spectrum gives 90 degrees, not NaN."""
    norms = torch.linalg.vector_norm(pred, dim=0) * torch.linalg.vector_norm(truth, dim=0)  # [N]
    cos = (pred * truth).sum(0) / (norms + 1e-30)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


class ReconstructionScores:
    """PSNR, SAM and per-band RMSE of a set of pixels fed in parts (crops, batches) as `dchag eval` scores
    them: per band, the MSE and the peak over all pixels pooled, then PSNR per band averaged over bands;
    the spectral angle per pixel averaged over all pixels (so a crop counts by its scored pixels)."""

    def __init__(self, bands: int):
        self.sse = torch.zeros(bands, dtype=torch.float64)
        self.count = 0
        self.peak = torch.full((bands,), -math.inf, dtype=torch.float64)
        self.angle_sum, self.pixels = 0.0, 0

    def add(self, pred, truth) -> None:
        """pred, truth [C, N] (N pixels; numpy arrays or tensors, scored in float64)."""
        pred, truth = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)
        if truth.shape[1] == 0:
            return
        self.sse += ((pred - truth) ** 2).sum(dim=1)
        self.count += truth.shape[1]
        self.peak = torch.maximum(self.peak, truth.abs().amax(dim=1))
        self.angle_sum += float(spectral_angle_deg(pred, truth).sum())
        self.pixels += truth.shape[1]

    def result(self, names: list[str]) -> dict:
        """{"psnr_db", "sam_deg", "band_rmse": {band name: RMSE}} in the data's units."""
        mse = self.sse / max(self.count, 1)
        return {
            "psnr_db": float(psnr_db(mse, self.peak).mean()),
            "sam_deg": self.angle_sum / max(self.pixels, 1),
            "band_rmse": {n: float(v) for n, v in zip(names, mse.sqrt())},
        }
