"""The evaluation's metrics give the numbers worked out by hand on tiny fields: latitude weights,
latitude-weighted RMSE, ACC (forecasts), PSNR and spectral angle (MAE). Each case is chosen so that a
plausible mistake (no weighting, a wrong sign, radians, the mean instead of the peak) gives another number."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dchag.data.era5 import ERA5Source, Grid
from dchag.data.synthetic_weather import SyntheticWeather
from dchag.eval.mae import _Accumulator
from dchag.tasks.forecast import lat_weighted_rmse
from dchag.tasks.metrics import anomaly_correlation, weighted_mse

# rows at latitudes 0 and 60 degrees: cos = 1 and 1/2, mean 3/4, so the weights are 4/3 and 2/3
TWO_ROWS = torch.tensor([4 / 3, 2 / 3], dtype=torch.float64)


def test_latitude_weights_are_cos_latitude_normalised_to_mean_one():
    era5 = ERA5Source.lat_weights(SimpleNamespace(grid=Grid(np.array([0.0, 60.0]), np.array([0.0]), False)))
    assert torch.allclose(era5.double(), TWO_ROWS, rtol=1e-6, atol=0)
    # 4 rows of the synthetic grid sit at -67.5, -22.5, 22.5, 67.5 degrees: cos / mean = 2 - sqrt2, sqrt2
    synthetic = SyntheticWeather(["t"], ["t"], (4, 8)).lat_weights().double()
    r2 = math.sqrt(2.0)
    assert torch.allclose(synthetic, torch.tensor([2 - r2, r2, r2, 2 - r2], dtype=torch.float64), rtol=1e-6, atol=0)
    assert not torch.allclose(synthetic, torch.ones(4, dtype=torch.float64), rtol=1e-2)  # not uniform


def test_a_constant_offset_has_that_offset_as_its_weighted_rmse():
    truth = torch.randn(3, 2, 2, 5, generator=torch.Generator().manual_seed(0))  # [B, C, H, W]
    pred = truth + 0.75
    assert torch.allclose(weighted_mse(pred, truth, TWO_ROWS).sqrt(), torch.full((3, 2), 0.75, dtype=torch.float64))
    assert torch.allclose(lat_weighted_rmse(pred, truth, TWO_ROWS.float()), torch.full((2,), 0.75))


def test_an_error_on_one_latitude_row_counts_by_that_rows_weight():
    """Error 3 on the equator row only: weighted MSE = (4/3 * 9 + 2/3 * 0) / 2 = 6 (unweighted: 4.5)."""
    truth = torch.zeros(1, 1, 2, 5)
    pred = truth.clone()
    pred[..., 0, :] = 3.0
    assert weighted_mse(pred, truth, TWO_ROWS).item() == pytest.approx(6.0, rel=1e-12)
    assert lat_weighted_rmse(pred, truth, TWO_ROWS.float()).item() == pytest.approx(math.sqrt(6.0), rel=1e-6)
    # counter-check: equal weights (a forgotten weighting) give another number
    assert weighted_mse(pred, truth, torch.ones(2)).item() == pytest.approx(4.5)
    # the same error on the 60-degree row instead: (2/3 * 9) / 2 = 3
    assert weighted_mse(pred.flip(2), truth, TWO_ROWS).item() == pytest.approx(3.0, rel=1e-12)


def test_acc_is_minus_one_for_opposite_anomalies_one_for_proportional_and_weighted_between():
    climatology = torch.full((1, 2, 3), 10.0)  # [C, H, W]
    anomaly = torch.tensor([[[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]])[None]  # [B=1, C=1, H=2, W=3]
    truth = climatology[None] + anomaly
    assert anomaly_correlation(climatology[None] - anomaly, truth, climatology, TWO_ROWS).item() == pytest.approx(-1.0)
    assert anomaly_correlation(climatology[None] + 2 * anomaly, truth, climatology, TWO_ROWS).item() == pytest.approx(
        1.0
    )
    # forecast anomaly [1, 0] and true anomaly [1, 1] down the two rows (one column):
    # ACC = (4/3) / sqrt(4/3 * 2) = sqrt(2/3); unweighted it would be 1/sqrt2
    clim = torch.zeros(1, 2, 1)
    f = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    o = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1)
    assert anomaly_correlation(f, o, clim, TWO_ROWS).item() == pytest.approx(math.sqrt(2 / 3), rel=1e-12)
    assert anomaly_correlation(f, o, clim, torch.ones(2)).item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # anomalies, not raw values: against a zero climatology the opposite forecast is not -1
    assert anomaly_correlation(climatology[None] - anomaly, truth, torch.zeros(1, 2, 3), TWO_ROWS).item() > 0


def _mae_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR and SAM as `dchag eval` computes them over pixels [C, N]."""
    acc = _Accumulator(truth.shape[0])
    acc.add(pred, truth)
    return acc.result([f"b{i}" for i in range(truth.shape[0])])


def test_psnr_is_ten_log10_of_peak_squared_over_mse_per_band_then_averaged():
    truth = np.array([[0.0, 1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]])  # [C=2 bands, N=4 pixels]
    pred = truth + np.array([[0.5], [0.1]])
    # band 0: peak 4, MSE 0.25 -> 10 log10(64); band 1: peak 1, MSE 0.01 -> 20 dB
    expected = (10 * math.log10(64.0) + 20.0) / 2
    got = _mae_metrics(pred, truth)
    assert got["psnr_db"] == pytest.approx(expected, rel=1e-12)
    assert got["band_rmse"] == pytest.approx({"b0": 0.5, "b1": 0.1}, rel=1e-12)
    # counter-check: a PSNR over the bands' mean value instead of the peak would be lower
    mean_peak = (10 * math.log10(1.75**2 / 0.25) + 20.0) / 2
    assert got["psnr_db"] != pytest.approx(mean_peak, rel=1e-3)


def test_spectral_angle_is_ninety_degrees_for_orthogonal_spectra_and_zero_for_scaled_ones():
    truth = np.array([[1.0, 1.0, 2.0], [0.0, 0.0, 2.0]])  # 2 bands x 3 pixels: spectra (1,0), (1,0), (2,2)
    assert _mae_metrics(np.array([[0.0, 0.0, 3.0], [1.0, 2.0, 3.0]]), truth)["sam_deg"] == pytest.approx(
        (90.0 + 90.0 + 0.0) / 3
    )
    # (1,1) against (1,0): 45 degrees; a brighter copy (3,0): 0 degrees; mean over pixels 15 degrees
    assert _mae_metrics(np.array([[1.0, 3.0, 1.0], [1.0, 0.0, 1.0]]), truth)["sam_deg"] == pytest.approx(15.0)
    # counter-check: the angle is in degrees, not radians
    assert _mae_metrics(np.array([[1.0, 3.0, 1.0], [1.0, 0.0, 1.0]]), truth)["sam_deg"] != pytest.approx(math.pi / 12)
