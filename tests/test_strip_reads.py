"""A context-parallel rank's sources read (or generate) only its strip of rows: for every source kind a
strip's batch equals those rows of the whole batch exactly, the reader is asked for those rows only, and
statistics and latitude weights stay the whole image's. One process, no model."""

from __future__ import annotations

import era5_files as E
import numpy as np
import pytest
import torch
from test_spectral_cube import cube, write_envi, write_geotiff

from dchag.data.era5 import ERA5Source
from dchag.data.row_strip import RowStrip
from dchag.data.spectral_cube import SpectralCubeSource
from dchag.data.synthetic_hyperspectral import SyntheticHyperspectral
from dchag.data.synthetic_weather import SyntheticWeather

INDICES = [0, 3, 1]


def _assert_strip_is_rows_of_whole(source, rows: slice, size) -> RowStrip:
    whole = source.batch(INDICES)
    strip = RowStrip(source, rows, size)
    assert strip.reads_rows  # read by the source, not cut afterwards
    part = strip.batch(INDICES)
    assert sorted(part) == sorted(whole)
    for key, value in whole.items():
        expected = value[..., rows, :] if value.dim() >= 3 else value
        assert part[key].shape == expected.shape, key
        assert torch.equal(part[key], expected), key
    if hasattr(source, "lat_weights"):
        assert torch.equal(strip.lat_weights(), source.lat_weights()[rows])  # the whole image's weights
    return strip


# ---------------------------------------------------------------------------------------------------
# ERA5


def _era5(tmp_path, grid, **kwargs) -> ERA5Source:
    ds = E.with_sea_field(E.dataset(times=12))  # latitudes descending in the file, as ERA5's
    path = E.write(ds, tmp_path / "era5.zarr", "zarr2")
    size = (19, 36) if grid == "native" else tuple(grid)
    split = {"train": 0.75, "test": 0.25}
    src = ERA5Source(
        str(path), ["t2m", "z_500", "sst"], ["t2m", "sst"], size, grid=grid, split=split, lead_range=(6, 12), **kwargs
    )
    src.stats = src.compute_stats()
    return src


@pytest.fixture
def isel_calls(monkeypatch):
    """Every xarray `isel` indexer the sources pass: the read windows."""
    import xarray as xr

    calls, isel = [], xr.DataArray.isel

    def spy(self, indexers=None, **kwargs):
        calls.append(dict(indexers or {}, **kwargs))
        return isel(self, indexers, **kwargs)

    monkeypatch.setattr(xr.DataArray, "isel", spy)
    return calls


def test_era5_on_its_own_grid_reads_only_the_strip_s_latitudes(tmp_path, isel_calls):
    src = _era5(tmp_path, "native", nan="mask", rollout_steps=2)
    rows = slice(4, 12)  # model rows (ascending latitude) 4..11 = file rows 7..14 (descending)
    stats = src.stats
    strip = _assert_strip_is_rows_of_whole(src, rows, (19, 36))
    assert {"x", "y", "x_valid", "y_valid", "forcings"} <= set(strip.batch(INDICES))
    isel_calls.clear()
    src.lat_read.clear()
    strip.batch(INDICES)
    windows = {(c["latitude"].start, c["latitude"].stop) for c in isel_calls if "latitude" in c}
    assert windows == {(7, 15)}, windows
    assert set(src.lat_read) == {(7, 15)}
    assert strip.compute_stats() == stats  # statistics: the whole training data's


def test_era5_under_bilinear_regridding_reads_only_the_source_rows_around_the_strip(tmp_path):
    """Bilinear interpolation is point by point: the strip's rows of the model grid come from the source
    rows that bracket their latitudes, and equal the whole regridded field's rows exactly."""
    src = _era5(tmp_path, [16, 32], nan="mask")
    strip = _assert_strip_is_rows_of_whole(src, slice(5, 11), (16, 32))  # latitudes -28.125 .. 28.125
    src.lat_read.clear()
    strip.batch(INDICES)
    assert set(src.lat_read) == {(6, 13)}  # source latitudes 30 .. -30 (descending in the file)


def test_era5_under_conservative_regridding_reads_whole_fields_and_cuts_after_regridding(tmp_path):
    """The simple exact choice there: conservative cells normalise over every source cell they overlap and
    need the cell edges around them, so whole fields are read and regridded, then cut."""
    src = _era5(tmp_path, [9, 18], nan="mask", regrid="conservative")
    strip = _assert_strip_is_rows_of_whole(src, slice(3, 6), (9, 18))
    src.lat_read.clear()
    strip.batch(INDICES)
    assert set(src.lat_read) == {(0, 19)}


# ---------------------------------------------------------------------------------------------------
# spectral cubes


def _spy_reads(source) -> list[tuple[int, int]]:
    """The row windows every reader of `source` is asked for, from now on."""
    asked = []
    for reader in source.scenes:
        read = reader.read

        def spy(bands, rows, cols, read=read):
            asked.append(tuple(rows))
            return read(bands, rows, cols)

        reader.read = spy
    return asked


def _cube_source(path, size, **kwargs) -> SpectralCubeSource:
    src = SpectralCubeSource(str(path), size, band_wavelengths=kwargs.pop("band_wavelengths", None), **kwargs)
    src.stats = src.compute_stats(samples=4)
    return src


@pytest.mark.parametrize("fmt", ["envi", "npy", "band-files-at-two-resolutions"])
def test_a_spectral_crop_s_strip_reads_only_its_rows_of_the_crop(tmp_path, fmt):
    data = cube(bands=5, height=20, width=24)
    wavelengths = None
    if fmt == "envi":
        path = write_envi(tmp_path / "c.hdr", data, "bil")
    elif fmt == "npy":
        path, wavelengths = tmp_path / "c.npy", [450.0, 550.0, 650.0, 750.0, 850.0]
        np.save(path, data)
    else:  # Sentinel-2-like: a 20 m band resampled to the 10 m grid
        path = tmp_path / "scene"
        path.mkdir()
        write_geotiff(path / "s2_B02.tif", data[:1])
        write_geotiff(path / "s2_B11.tif", data[1:2, ::2, ::2])
    src = _cube_source(path, (12, 16), band_wavelengths=wavelengths, seed=5, nan="mask")
    stats, rows = src.stats, slice(5, 9)
    strip = _assert_strip_is_rows_of_whole(src, rows, (12, 16))
    asked = _spy_reads(src)
    strip.batch(INDICES)
    tops = [src.crop(i)[1] for i in INDICES]
    assert asked == [(top + 5, top + 9) for top in tops]
    assert strip.compute_stats(samples=4) == stats


def test_a_strip_of_no_data_is_served_masked_while_its_whole_crop_holds_data(tmp_path):
    data = cube()
    data[:, :4, :] = -9999.0  # the first rows carry the no-data value
    path = write_envi(tmp_path / "c.hdr", data, "bsq", **{"data ignore value": -9999})
    src = _cube_source(path, (20, 24), nan="mask")  # one crop: the whole scene
    batch = RowStrip(src, slice(0, 4), (20, 24)).batch([0])
    assert batch["x"].shape == (1, 5, 4, 24) and not batch["x_valid"].any() and (batch["x"] == 0).all()


# ---------------------------------------------------------------------------------------------------
# synthetic sources: only the strip's rows are generated


def test_synthetic_weather_generates_only_the_strip_s_rows(monkeypatch):
    src = SyntheticWeather(["t2m", "z_500", "u_850"], ["t2m", "z_500"], (20, 32), seed=3, rollout_steps=3)
    rows = slice(12, 20)
    _assert_strip_is_rows_of_whole(src, rows, (20, 32))
    shapes, latents = [], SyntheticWeather._latents

    def spy(self, amp, hours, rows=None):
        out = latents(self, amp, hours, rows)
        shapes.append(tuple(out.shape[2:]))
        return out

    monkeypatch.setattr(SyntheticWeather, "_latents", spy)
    RowStrip(src, rows, (20, 32)).batch(INDICES)
    assert set(shapes) == {(8, 32)}


def test_synthetic_hyperspectral_generates_only_the_strip_s_rows(monkeypatch):
    src = SyntheticHyperspectral([f"b{w:.1f}" for w in (450.0, 600.0, 750.0, 900.0)], (20, 16), seed=2)
    rows = slice(0, 7)
    _assert_strip_is_rows_of_whole(src, rows, (20, 16))
    shapes, abundances = [], SyntheticHyperspectral._abundances

    def spy(self, index, rows=None):
        out = abundances(self, index, rows)
        shapes.append(tuple(out.shape[1:]))
        return out

    monkeypatch.setattr(SyntheticHyperspectral, "_abundances", spy)
    RowStrip(src, rows, (20, 16)).batch(INDICES)
    assert set(shapes) == {(7, 16)}


def test_a_source_that_cannot_read_rows_is_cut_after_reading():
    """The fallback: a source kind without `rows` is read whole and cut in the data-loader worker."""

    class Whole:
        def batch(self, indices):
            return {"x": torch.arange(2 * 3 * 8 * 4.0).view(2, 3, 8, 4), "lead_hours": torch.ones(2)}

    strip = RowStrip(Whole(), slice(2, 5), (8, 4))
    assert not strip.reads_rows
    assert torch.equal(strip.batch([0, 1])["x"], Whole().batch([0, 1])["x"][..., 2:5, :])
