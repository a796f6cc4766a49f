"""The evaluation's metrics give the numbers worked out by hand on tiny fields: latitude weights,
latitude-weighted RMSE (also NaN-masked), ACC with static and per-forecast climatologies (forecasts), PSNR
and spectral angle (MAE); PSNR and SAM also agree with torchmetrics, an independent implementation, on
random cubes. Each case is chosen so that a plausible mistake (no weighting, a wrong sign, radians, the mean
instead of the peak, per-image instead of pooled averages) gives another number."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dchag.data.era5 import ERA5Source, Grid
from dchag.data.synthetic_weather import SyntheticWeather
from dchag.tasks.forecast import lat_weighted_mse, masked_sse
from dchag.tasks.metrics import ReconstructionScores, anomaly_correlation, psnr_db, spectral_angle_deg

# rows at latitudes 0 and 60 degrees: cos = 1 and 1/2, mean 3/4, so the weights are 4/3 and 2/3
TWO_ROWS = torch.tensor([4 / 3, 2 / 3], dtype=torch.float64)


def weighted_mse(pred, truth, lat_weights, valid=None):
    """Per field [B, C], as `dchag eval` scores forecasts."""
    return lat_weighted_mse(pred, truth, lat_weights, valid, dims=(2, 3))


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
    assert lat_weighted_mse(pred, truth, TWO_ROWS.float()).sqrt().item() == pytest.approx(0.75, rel=1e-6)  # the loss


def test_an_error_on_one_latitude_row_counts_by_that_rows_weight():
    """Error 3 on the equator row only: weighted MSE = (4/3 * 9 + 2/3 * 0) / 2 = 6 (unweighted: 4.5)."""
    truth = torch.zeros(1, 1, 2, 5)
    pred = truth.clone()
    pred[..., 0, :] = 3.0
    assert weighted_mse(pred, truth, TWO_ROWS).item() == pytest.approx(6.0, rel=1e-12)
    assert lat_weighted_mse(pred, truth, TWO_ROWS.float()).item() == pytest.approx(6.0, rel=1e-6)  # the loss
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
    acc = ReconstructionScores(truth.shape[0])
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


def test_nan_masked_rmse_scores_valid_pixels_by_their_latitude_weight():
    """Rows at 0 and 60 degrees, 2 columns; error 3 at (equator, col 0), the 60-degree row's col 0 is NaN
    (masked): MSE = (4/3 * 9 + 4/3 * 0 + 2/3 * 0) / (4/3 + 4/3 + 2/3) = 12 / (10/3) = 3.6."""
    truth = torch.tensor([[0.0, 0.0], [float("nan"), 0.0]]).view(1, 1, 2, 2)
    pred = torch.tensor([[3.0, 0.0], [5.0, 0.0]]).view(1, 1, 2, 2)
    valid = ~truth.isnan()
    assert lat_weighted_mse(pred, truth, TWO_ROWS, valid).item() == pytest.approx(3.6, rel=1e-12)
    assert weighted_mse(pred, truth, TWO_ROWS, valid).item() == pytest.approx(3.6, rel=1e-12)
    # counter-checks: dividing by all weights (8/3 + ... = 4) or an unweighted masked mean give other numbers
    assert lat_weighted_mse(pred, truth, TWO_ROWS, valid).item() != pytest.approx(12 / 4, rel=1e-3)
    assert lat_weighted_mse(pred, truth, torch.ones(2), valid).item() == pytest.approx(3.0, rel=1e-6)
    assert lat_weighted_mse(pred, truth, TWO_ROWS).isnan()  # unmasked, the NaN pixel poisons the loss
    # a field with no valid pixel scores 0, not NaN (dchag eval leaves such forecasts out)
    none = torch.zeros_like(valid)
    assert weighted_mse(pred, truth, TWO_ROWS, none).item() == 0.0


def test_channel_parallel_partial_sums_add_up_to_the_one_device_loss():
    """What a tensor-parallel rank computes (masked_sse over its channels) adds up to lat_weighted_mse of the
    whole prediction, with and without a mask; the per-field means average to the scalar loss."""
    g = torch.Generator().manual_seed(1)
    pred, truth = torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 5, 4, 6, generator=g)  # [B, C, H, W]
    w = torch.rand(4, generator=g) + 0.5
    valid = torch.rand(2, 5, 4, 6, generator=g) > 0.3
    err = (pred - truth) ** 2
    for mask in (None, valid):
        parts = [masked_sse(err[:, c], w, None if mask is None else mask[:, c]) for c in (slice(0, 2), slice(2, 5))]
        sse, weight = (sum(p[i] for p in parts) for i in (0, 1))
        whole = lat_weighted_mse(pred, truth, w, mask)
        if mask is None:  # the unmasked loss divides by the element count, as step.compute_loss does under TP
            assert torch.allclose(sse / err.numel(), whole, rtol=1e-6, atol=0)
        else:
            assert torch.allclose(sse / weight, whole, rtol=1e-6, atol=0)
            assert not torch.allclose(sse / err.numel(), whole, rtol=1e-2)  # counter-check: the mask counts
    assert torch.allclose(lat_weighted_mse(pred, truth, w, dims=(2, 3)).mean(), lat_weighted_mse(pred, truth, w))


def test_acc_subtracts_a_climatology_that_varies_over_the_grid_and_per_forecast():
    """Anomalies [1, 0] (forecast) and [1, 1] (truth) down the two rows give sqrt(2/3) whatever climatology
    they sit on: a map [C, H, W] for all forecasts, or one map per forecast [B, C, H, W]."""
    f_anom = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    o_anom = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1)
    static = torch.tensor([5.0, -3.0]).view(1, 2, 1)  # [C, H, W]
    got = anomaly_correlation(static[None] + f_anom, static[None] + o_anom, static, TWO_ROWS).item()
    assert got == pytest.approx(math.sqrt(2 / 3), rel=1e-12)
    per_forecast = torch.stack([static, static + torch.tensor([2.0, 7.0]).view(1, 2, 1)])  # [B=2, C, H, W]
    acc = anomaly_correlation(per_forecast + f_anom, per_forecast + o_anom, per_forecast, TWO_ROWS)
    assert torch.allclose(acc, torch.full((2, 1), math.sqrt(2 / 3), dtype=torch.float64), rtol=1e-12, atol=0)
    # counter-check: scoring the second forecast against the first one's climatology gives another number
    wrong = anomaly_correlation(per_forecast + f_anom, per_forecast + o_anom, static, TWO_ROWS)
    assert wrong[1].item() != pytest.approx(math.sqrt(2 / 3), rel=1e-3)


def test_psnr_and_sam_agree_with_torchmetrics_on_random_cubes():
    """Convention mapping: our PSNR is, per band b, torchmetrics' PSNR of that band over all pixels of all
    crops pooled with data_range = the band's largest |true value|, then the mean over bands; our SAM is
    torchmetrics' spectral_angle_mapper (radians, mean over pixels) in degrees, over all pixels pooled."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, spectral_angle_mapper

    g = torch.Generator().manual_seed(2)
    truth = torch.rand(3, 6, 8, 8, generator=g, dtype=torch.float64) * torch.linspace(0.2, 1.0, 6).view(1, 6, 1, 1)
    pred = truth + 0.05 * torch.randn(truth.shape, generator=g, dtype=torch.float64)  # [B, C, H, W] reflectance
    scores = ReconstructionScores(6)
    for image_p, image_t in zip(pred, truth):  # fed crop by crop, as dchag eval does: pixels [C, H*W]
        scores.add(image_p.flatten(1).numpy(), image_t.flatten(1).numpy())
    ours = scores.result([f"b{i}" for i in range(6)])
    peaks = truth.abs().amax(dim=(0, 2, 3))  # [C]
    reference = [peak_signal_noise_ratio(pred[:, b], truth[:, b], data_range=float(peaks[b])) for b in range(6)]
    # torchmetrics holds data_range in float32: agreement to its precision
    assert ours["psnr_db"] == pytest.approx(float(torch.stack(reference).mean()), rel=1e-6)
    sam_deg = math.degrees(float(spectral_angle_mapper(pred, truth)))
    assert ours["sam_deg"] == pytest.approx(sam_deg, rel=1e-9)
    # uneven pixel sets (masked patches): pooled pixels as one [1, C, N, 1] image
    keep = torch.rand(3, 8, 8, generator=g) > 0.6
    pooled_p, pooled_t = pred.permute(1, 0, 2, 3)[:, keep], truth.permute(1, 0, 2, 3)[:, keep]  # [C, N]
    masked = ReconstructionScores(6)
    for b in range(3):
        masked.add(pred[b][:, keep[b]], truth[b][:, keep[b]])
    sam_pooled = math.degrees(float(spectral_angle_mapper(pooled_p[None, ..., None], pooled_t[None, ..., None])))
    assert masked.result([f"b{i}" for i in range(6)])["sam_deg"] == pytest.approx(sam_pooled, rel=1e-9)
    # counter-checks: one data range for all bands, PSNR per crop averaged, or radians give other numbers
    one_range = float(peak_signal_noise_ratio(pred, truth, data_range=float(peaks.max())))
    per_crop = float(peak_signal_noise_ratio(pred, truth, data_range=float(peaks.max()), dim=(1, 2, 3)))
    assert ours["psnr_db"] != pytest.approx(one_range, rel=1e-3)
    assert ours["psnr_db"] != pytest.approx(per_crop, rel=1e-3)
    assert ours["sam_deg"] != pytest.approx(math.radians(sam_deg), rel=1e-3)


def test_psnr_and_spectral_angle_functions_give_hand_values():
    """The public functions dchag eval's scores are built on: 10 log10(2^2 / 0.01) = 26.02 dB; spectra (1, 0)
    vs (1, 1) are 45 degrees apart, vs (0, 1) 90, vs (2, 0) 0; a zero spectrum is 90, not NaN."""
    got = psnr_db(torch.tensor([0.01, 1.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([10 * math.log10(400.0), 0.0], dtype=torch.float64), rtol=1e-12, atol=0)
    truth = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # [C=2, N=4]
    pred = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    angles = spectral_angle_deg(pred, truth)
    assert torch.allclose(angles, torch.tensor([45.0, 90.0, 0.0, 90.0], dtype=torch.float64), rtol=0, atol=1e-6)
    assert not torch.allclose(angles, torch.deg2rad(angles), atol=1e-3)  # counter-check: degrees, not radians


def test_the_mean_spectrum_baseline_sees_only_the_bands_the_model_is_given():
    """`dchag eval --channels`: the baseline averages the visible pixels of the kept bands only and predicts
    a left-out band as its normalisation mean, so the left-out bands' pixels change nothing in it."""
    from dchag.eval.mae import mean_spectrum_baseline

    truth = np.arange(3 * 2 * 2, dtype=np.float64).reshape(3, 2, 2)  # 3 bands of 2 x 2 pixels
    visible = np.array([[True, False], [True, False]])  # the left column
    kept, band_mean = np.array([True, False, True]), np.array([[10.0], [20.0], [30.0]])
    got = mean_spectrum_baseline(truth, visible, kept, band_mean)
    assert got.tolist() == [[1.0], [20.0], [9.0]]  # band 0: (0 + 2) / 2, band 2: (8 + 10) / 2
    other = truth.copy()
    other[1] = 1e6  # the left-out band's pixels
    assert np.array_equal(mean_spectrum_baseline(other, visible, kept, band_mean), got)
    # counter-check: the baseline over every band (what it was before) does read the left-out band
    assert mean_spectrum_baseline(other, visible, None, band_mean)[1, 0] == 1e6
