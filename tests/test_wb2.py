"""WeatherBench 2's definitions: date splits that include their whole last day and never leak a target
into another split, and the climatology by day of year x hour of day used by ACC and the climatology
baseline of `dchag eval`."""

from __future__ import annotations

import numpy as np
import pytest
from era5_files import dataset, write

from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.data.era5 import ERA5Source
from dchag.data.moments import day_of_year_and_hour

SEASON, DAY, NOISE = 3.0, 2.0, 1.0  # amplitudes of the seasonal and diurnal cycles, noise sd (kelvin)


def source(path, split, lead_range=(6, 6), **kwargs) -> ERA5Source:
    return ERA5Source(str(path), ["t2m"], ["t2m"], (19, 36), split=split, lead_range=lead_range, **kwargs)


@pytest.fixture(scope="module")
def three_days(tmp_path_factory):
    """6-hourly, 2020-01-01 00:00 .. 2020-01-03 18:00 (12 steps)."""
    return write(dataset(times=12), tmp_path_factory.mktemp("days") / "d.nc", "netcdf")


# ---------------------------------------------------------------------------------------------------
# splits


def test_a_date_range_includes_its_whole_last_day_and_a_timestamp_keeps_its_meaning(three_days):
    whole = source(three_days, {"train": ["2020-01-01", "2020-01-02"]})
    assert whole.split_indices.tolist() == list(range(8))  # through 2020-01-02 18:00
    exact = source(three_days, {"train": ["2020-01-01", "2020-01-02T00:00"]})
    assert exact.split_indices.tolist() == list(range(5))  # counter-check: ends at 00:00 as written


def test_overlapping_date_splits_are_refused_naming_both_and_the_dates(three_days):
    split = {"train": ["2020-01-01", "2020-01-02"], "test": ["2020-01-02T12:00", "2020-01-03"]}
    message = r"parts 'train' and 'test' overlap from 2020-01-02T12:00 to 2020-01-02T23:59"
    with pytest.raises(ConfigError, match=message):
        source(three_days, split)
    source(three_days, {**split, "test": ["2020-01-03T06:00", "2020-01-03"]})  # counter-check: disjoint is accepted


def test_a_target_of_one_split_that_is_an_input_of_another_is_refused_at_the_largest_lead(three_days):
    split = {"train": ["2020-01-01", "2020-01-01T18:00"], "test": ["2020-01-02T06:00", "2020-01-03"]}
    train = source(three_days, split, lead_range=(6, 6))  # its targets reach 2020-01-02 00:00, in no split
    assert [3, 4, 6] in train.pairs.tolist()  # a date split names input times; the target may lie past its end
    with pytest.raises(ConfigError, match=r"'train' ends 2020-01-01T18:00 and its targets reach 12 h later, into"):
        source(three_days, split, lead_range=(6, 12))
    with pytest.raises(ConfigError, match=r"targets reach 18 h later, into 'test' inputs from 2020-01-02T06:00"):
        source(three_days, split, split_name="test", fixed_lead=18)  # the eval lead counts too


def test_fraction_splits_keep_every_target_inside_the_split(three_days):
    train = source(three_days, {"train": 0.5, "test": 0.5}, lead_range=(6, 12))
    assert train.pairs[:, 1].max() == 5  # the last training step: no target crosses into the test half


# ---------------------------------------------------------------------------------------------------
# climatology by day of year x hour of day


def seasonal_dataset(days: int = 730, seed: int = 0):
    """t2m on a 4 x 8 global grid, 6-hourly from 2019-01-01: its own seasonal and diurnal cycle (functions
    of day of year and hour of day only, phase shifted by latitude and longitude) plus white noise."""
    import xarray as xr

    times = np.datetime64("2019-01-01T00:00", "ns") + np.arange(days * 4) * np.timedelta64(6, "h")
    lat, lon = np.array([-67.5, -22.5, 22.5, 67.5]), np.arange(8) * 45.0
    doy, hour = day_of_year_and_hour(times)
    season = SEASON * np.cos(2 * np.pi * doy / 365.0)[:, None, None] * np.sign(lat)[None, :, None]
    diurnal = DAY * np.cos(2 * np.pi * hour[:, None, None] / 24.0 + np.deg2rad(lon)[None, None, :])
    noise = np.random.default_rng(seed).normal(0.0, NOISE, (len(times), 4, 8))
    t2m = 280.0 + season + diurnal + noise
    coords = {"time": times, "latitude": lat, "longitude": lon}
    return xr.Dataset({"t2m": (("time", "latitude", "longitude"), t2m.astype(np.float32), {"units": "K"})}, coords)


@pytest.fixture(scope="module")
def seasonal_run(tmp_path_factory):
    """A 2-step forecast run on two years of seasonal data: 1.5 years of training, 0.5 year of test."""
    from dchag.train.loop import train

    folder = tmp_path_factory.mktemp("wb2")
    path = write(seasonal_dataset(), folder / "seasonal.nc", "netcdf")
    cfg = load_config(
        None,
        [
            "data.kind=era5",
            f"data.path={path}",
            "data.channels=[t2m]",
            "data.split={train: 0.75, test: 0.25}",
            "data.lead_hours=[6, 6]",
            "model.img_size=[4, 8]",
            "model.patch_size=2",
            "model.embed_dim=16",
            "model.depth=1",
            "model.num_heads=2",
            "model.hierarchy.groups=1",
            "train.batch_size=4",
            "train.steps=2",
            "data.workers=0",
        ],
    )
    train(cfg, folder / "run", progress=False)
    return folder / "run", path


def test_eval_uses_the_day_of_year_hour_climatology_whose_rmse_is_the_noise(seasonal_run, monkeypatch):
    from dchag.eval.forecast import evaluate_forecast

    run, _ = seasonal_run
    result = evaluate_forecast(run, batch_size=64, progress=False)
    assert result["climatology"] == "day_of_year_hour"
    (record,) = result["metrics"]
    # its own seasonal + diurnal cycle is all the climatology can know: what is left is the noise (the 61-day
    # window damps the seasonal cycle by ~2 %, the training years leave ~1 % estimation noise)
    assert record["climatology_rmse"] == pytest.approx(NOISE, rel=0.03)
    monkeypatch.setattr(ERA5Source, "seasonal_climatology", lambda *a, **k: None)
    static = evaluate_forecast(run, batch_size=64, progress=False)
    assert static["climatology"] == "static"  # counter-check: the static per-cell mean misses both cycles
    expected = np.sqrt(NOISE**2 + SEASON**2 / 2 + DAY**2 / 2)
    assert static["metrics"][0]["climatology_rmse"] == pytest.approx(expected, rel=0.1)


def test_a_training_split_shorter_than_a_year_keeps_the_static_climatology(seasonal_run):
    _, path = seasonal_run
    short = ERA5Source(str(path), ["t2m"], ["t2m"], (4, 8), split={"train": 0.45, "test": 0.55}, lead_range=(6, 6))
    static = {"t2m": np.zeros((4, 8))}
    assert short.seasonal_climatology(["t2m"], static) is None  # 0.9 years: some days of the year are missing
    year = ERA5Source(str(path), ["t2m"], ["t2m"], (4, 8), split={"train": 0.55, "test": 0.45}, lead_range=(6, 6))
    table = year.seasonal_climatology(["t2m"], static)  # counter-check: 1.1 years cover every day
    assert table["hours"] == [0, 6, 12, 18] and table["table"]["t2m"].shape == (366, 4, 4, 8)
