"""data.regrid: conservative (area-weighted) coarsening with xarray-regrid, as WeatherBench 2 makes its
coarse grids, checked against hand-computed block means on the sphere; bilinear stays the default and
unchanged; the method is part of the data's fingerprint and of the settings a resume may not change."""

from __future__ import annotations

import numpy as np
import pytest
from era5_files import dataset, write

from dchag.config import Config, to_dict
from dchag.data.era5 import ERA5Source, conservative, regrid, target_grid
from dchag.train.resume_check import config_changes
from dchag.train.stats import fingerprint_of, why_not_reusable


def nested_source(h: int = 32, w: int = 64):
    """A global grid of 2h x 2w cells that nest in WeatherBench's h x w grid: latitudes without poles,
    longitudes at the cell centres (j + 1/2) 360/2w, so coarse cell J covers source columns 2J-1 and 2J
    (coarse cell 0 wraps around: columns 2w-1 and 0)."""
    lat = -90.0 + (np.arange(2 * h) + 0.5) * 180.0 / (2 * h)
    lon = (np.arange(2 * w) + 0.5) * 360.0 / (2 * w)
    return lat, lon, target_grid(lat, lon, (h, w))


def coarse_cell_of_column(w: int) -> np.ndarray:
    """[2w]: the coarse longitude cell each source column lies in (see nested_source)."""
    return ((np.arange(2 * w) + 1) // 2) % w


def test_a_field_constant_on_each_coarse_cell_regrids_to_those_constants():
    lat, lon, grid = nested_source()
    constants = np.random.default_rng(0).normal(size=(2, 32, 64))  # [k, H, W]
    fine = constants[:, np.arange(64) // 2][:, :, coarse_cell_of_column(64)]  # [k, 64, 128]
    np.testing.assert_allclose(conservative(fine, lat, lon, grid), constants, rtol=0, atol=1e-12)


def test_a_2x_coarsening_equals_hand_computed_area_weighted_block_means_across_the_dateline():
    lat, lon, grid = nested_source()
    fine = np.random.default_rng(1).normal(size=(1, 64, 128))
    edges = np.deg2rad(-90.0 + np.arange(65) * 180.0 / 64)
    area = np.sin(edges[1:]) - np.sin(edges[:-1])  # [64]: a cell's area on the sphere / its width in longitude
    expected = np.zeros((32, 64))
    for i in range(32):
        for j in range(64):
            cols = [(2 * j - 1) % 128, 2 * j]  # coarse column 0 takes the last source column and the first
            rows = [2 * i, 2 * i + 1]
            block, weight = fine[0][np.ix_(rows, cols)], np.repeat(area[rows, None], 2, axis=1)
            expected[i, j] = (block * weight).sum() / weight.sum()
    out = conservative(fine, lat, lon, grid)[0]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert abs(out[:, 0] - fine[0, :, [127, 0]].mean(axis=0).reshape(32, 2).mean(axis=1)).max() > 1e-3  # weighted


def smooth(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    return 280.0 + 20.0 * np.cos(la) ** 2 + 5.0 * np.sin(la) * np.cos(2 * lo) + 3.0 * np.sin(3 * lo) * np.cos(la)


def global_mean(values: np.ndarray, lat: np.ndarray) -> float:
    """The cos(latitude)-weighted mean of [H, W] (WeatherBench 2's area weighting)."""
    w = np.cos(np.deg2rad(lat))
    return float((values * w[:, None]).sum() / w.sum() / values.shape[1])


@pytest.mark.parametrize(
    "lat, lon, rtol",
    [
        (*nested_source()[:2], 1e-12),  # nested cells: exactly conservative
        (np.arange(-90.0, 90.1, 1.0), np.arange(0.0, 360.0, 1.0), 1e-6),  # ERA5's layout (poles, 0..359) at 1 deg
    ],
    ids=["nested", "era5-1deg-with-poles"],
)
def test_conservative_coarsening_keeps_the_latitude_weighted_global_mean(lat, lon, rtol):
    grid = target_grid(lat, lon, (32, 64))
    out = conservative(smooth(lat, lon)[None], lat, lon, grid)[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(global_mean(out, grid.lat), global_mean(smooth(lat, lon), lat), rtol=rtol)


def test_a_nan_source_cell_makes_only_the_coarse_cell_over_it_nan():
    lat, lon, grid = nested_source()
    fine = np.ones((1, 64, 128))
    fine[0, 10, 0] = np.nan  # row 10 -> coarse row 5; column 0 -> coarse column 0
    out = conservative(fine, lat, lon, grid)[0]
    assert np.isnan(out[5, 0]) and np.isnan(out).sum() == 1


def test_bilinear_stays_the_default_and_conservative_is_used_and_fingerprinted_when_asked(tmp_path):
    path = write(dataset(times=2, grid_step=1.0), tmp_path / "d.nc", "netcdf")
    kwargs = dict(split={"train": 1.0}, lead_range=(6, 6), grid=[32, 64])
    default = ERA5Source(str(path), ["t2m", "z_500"], ["t2m"], (32, 64), **kwargs)
    bilinear = ERA5Source(str(path), ["t2m", "z_500"], ["t2m"], (32, 64), regrid="bilinear", **kwargs)
    cons = ERA5Source(str(path), ["t2m", "z_500"], ["t2m"], (32, 64), regrid="conservative", **kwargs)
    native = ERA5Source(str(path), ["t2m", "z_500"], ["t2m"], (181, 360), split={"train": 1.0}, lead_range=(6, 6))
    times = np.array([0, 1])
    for channel in ("t2m", "z_500"):
        assert np.array_equal(default.read(channel, times), bilinear.read(channel, times))
        by_hand = regrid(native.read(channel, times).astype(np.float64), native.src_lat, native.src_lon, cons.grid,
                         "conservative")  # fmt: skip
        np.testing.assert_allclose(cons.read(channel, times), by_hand, rtol=1e-6)
        assert not np.allclose(cons.read(channel, times), default.read(channel, times), rtol=1e-5)
    # statistics of one method are not reused for the other; bilinear's fingerprint is the one from before
    assert "regrid" not in fingerprint_of(default)
    stats = {"fingerprint": fingerprint_of(default), "channels": {"t2m": {}, "z_500": {}}, "climatology": {"t2m": 0}}
    assert why_not_reusable(stats, bilinear, fingerprint_of(bilinear)) is None
    assert "data.regrid changed" in why_not_reusable(stats, cons, fingerprint_of(cons))


def test_a_resume_refuses_a_changed_regrid_method():
    saved, cfg = to_dict(Config()), Config()
    saved["data"].pop("regrid")  # a config written before data.regrid existed was bilinear
    assert config_changes(saved, cfg) == []
    cfg.data.regrid = "conservative"
    assert config_changes(saved, cfg) == [("data.regrid", "bilinear", "conservative")]
