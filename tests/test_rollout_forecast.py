"""Forecast rollouts written in WeatherBench 2's Zarr layout (`dchag forecast`, `dchag.use.rollout`) and the
scoring of stored forecasts (`dchag eval --forecast`): a rollout's first step scores as `dchag eval --run`
scores the run, another model's file in WeatherBench 2's own conventions is read, predicted channels feed
the next step while the others come from the data, and a tensor-parallel rollout equals the one-process one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from dist_workers import SMALL_MODEL
from era5_files import dataset, era5_config, write

import dchag.use.rollout as rollout_module
from dchag.cli import main
from dchag.configure import load_config
from dchag.data.era5 import ERA5Source
from dchag.data.wb2_layout import open_forecast
from dchag.eval import forecast as forecast_eval
from dchag.eval.forecast import evaluate_forecast
from dchag.train.loop import train

ROOT = Path(__file__).parents[1]
TIGHT = 1e-6  # relative: float32 storage of physical values is the only difference from `dchag eval --run`


def quiet(argv: list[str]) -> int:
    with contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


@pytest.fixture(scope="module")
def era5(tmp_path_factory) -> dict:
    """A 2-step ERA5 run on 16 six-hourly steps (test split: the last 4), and its 3-step rollout at 6 h."""
    tmp = tmp_path_factory.mktemp("era5")
    path = write(dataset(times=16), tmp / "era5.nc", "netcdf")
    with contextlib.redirect_stderr(io.StringIO()):
        train(era5_config(path, "train.steps=2", "data.workers=0"), tmp / "run", progress=False)
    out = tmp / "forecast.zarr"
    assert quiet(["forecast", "--run", str(tmp / "run"), "--lead-hours", "6", "--steps", "3", "--out", str(out)]) == 0
    return {"tmp": tmp, "path": str(path), "run": str(tmp / "run"), "forecast": str(out)}


def by_key(result: dict) -> dict:
    return {(r["variable"], r["lead_hours"]): r for r in result["metrics"]}


def close(a: float, b: float, rel: float = TIGHT) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_the_forecast_store_opens_with_weatherbench_dimensions_names_units_and_chunks(era5):
    ds = xr.open_zarr(era5["forecast"])
    assert set(ds.dims) == {"time", "prediction_timedelta", "latitude", "longitude", "level"}
    assert ds["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert ds["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert ds["level"].values.tolist() == [500] and ds["2m_temperature"].attrs["units"] == "K"
    assert (ds["prediction_timedelta"].values / np.timedelta64(1, "h")).tolist() == [6, 12, 18]
    assert ds.sizes["time"] == 4 and np.all(np.diff(ds["latitude"].values) > 0)  # the test split; south first
    assert ds["geopotential"].encoding["chunks"][0] == 1  # one chunk per initialisation time
    assert open_forecast(era5["forecast"]).channels == ["t2m", "z_500"]  # our names come back


def test_a_rollouts_first_step_scores_exactly_as_eval_run_and_later_leads_are_scored(era5):
    json_out = era5["tmp"] / "stored.json"
    argv = ["eval", "--forecast", era5["forecast"], "--data-path", era5["path"], "--json", str(json_out)]
    assert quiet([*argv, "--no-progress"]) == 0
    stored = by_key(json.loads(json_out.read_text()))
    reference = by_key(evaluate_forecast(era5["run"], lead_hours=[6], progress=False))
    for key, ref in reference.items():
        got = stored[key]
        assert got["samples"] == ref["samples"] == 3
        for metric in ("rmse", "persistence_rmse", "climatology_rmse"):
            assert close(got[metric], ref[metric]), (key, metric, got[metric], ref[metric])
        for metric in ("acc", "persistence_acc"):  # the truth before the forecasts = the run's training split
            assert abs(got[metric] - ref[metric]) <= TIGHT, (key, metric)
    assert sorted({lead for _, lead in stored}) == [6, 12, 18]
    assert [stored[("t2m", lead)]["samples"] for lead in (6, 12, 18)] == [3, 2, 1]  # valid times the data hold
    # the run's own data and training split as the truth: the same numbers
    run_truth = by_key(json.loads(_eval_json(era5, ["--run", era5["run"]])))
    for key, got in stored.items():
        assert close(run_truth[key]["rmse"], got["rmse"], 1e-12) and abs(run_truth[key]["acc"] - got["acc"]) < 1e-9


def test_a_forecast_written_one_initialisation_at_a_time_keeps_its_times_and_values(era5):
    """--batch-size 1: the first piece holds one 00Z time, the next a 06Z one; the store's time units are
    fixed up front, so the appended times are not stored on a grid inferred from the first piece."""
    out = era5["tmp"] / "one-by-one.zarr"
    argv = ["forecast", "--run", era5["run"], "--lead-hours", "6", "--steps", "3", "--out", str(out)]
    assert quiet([*argv, "--batch-size", "1", "--no-progress"]) == 0
    single, batched = xr.open_zarr(out).load(), xr.open_zarr(era5["forecast"]).load()
    assert (np.diff(single["time"].values) == np.timedelta64(6, "h")).all()
    xr.testing.assert_identical(single.drop_attrs(), batched.drop_attrs())


def test_an_export_folder_forecasts_exactly_as_the_run_it_was_exported_from(era5, tmp_path):
    """`--run EXPORT`: the export's config names the training data file; `--data-path` (here a copy of
    it) replaces it, as for a run folder, and the values equal the run's bit for bit (one CPU process)."""
    export = tmp_path / "export"
    assert quiet(["export", "--run", era5["run"], "--out", str(export)]) == 0
    data = shutil.copy(era5["path"], tmp_path / "elsewhere.nc")
    out = tmp_path / "from-export.zarr"
    argv = ["forecast", "--run", str(export), "--lead-hours", "6", "--steps", "3", "--out", str(out)]
    assert quiet([*argv, "--data-path", str(data), "--no-progress"]) == 0
    exported, run = xr.open_zarr(out).load(), xr.open_zarr(era5["forecast"]).load()
    assert exported.attrs["dchag_run"] == str(export) and exported.attrs["dchag_data"] == str(data)
    xr.testing.assert_identical(exported.drop_attrs(), run.drop_attrs())


def test_under_nan_masking_a_stored_forecast_scores_exactly_as_eval_run(era5, tmp_path):
    """data.nan=mask, t2m NaN in a box at two test times: a pixel with NaN truth is not scored, and one
    where only the initialisation is NaN is scored with persistence at the channel mean, as eval --run's
    normalised inputs (0 there) give it."""
    ds = dataset(times=16)
    ds["t2m"].values[12, 2:6, 3:9] = np.nan  # persistence of init 12 (its target, 13, is whole)
    ds["t2m"].values[14, 8:12, 20:30] = np.nan  # the target of init 13 and the persistence of init 14
    path = str(write(ds, tmp_path / "holes.nc", "netcdf"))
    run = tmp_path / "run"
    shutil.copytree(era5["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["nan"] = "mask"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "f.zarr"
    argv = ["forecast", "--run", str(run), "--data-path", path, "--lead-hours", "6", "--out", str(out)]
    assert quiet([*argv, "--no-progress"]) == 0
    truth = ["--run", str(run), "--data-path", path]
    assert quiet(["eval", "--forecast", str(out), *truth, "--json", str(tmp_path / "s.json"), "--no-progress"]) == 0
    stored = by_key(json.loads((tmp_path / "s.json").read_text()))
    reference = by_key(evaluate_forecast(run, lead_hours=[6], data_path=path, progress=False))
    assert stored.keys() == reference.keys()
    for key, ref in reference.items():
        for metric in ("rmse", "persistence_rmse", "climatology_rmse"):
            assert close(stored[key][metric], ref[metric]), (key, metric, stored[key][metric], ref[metric])
        for metric in ("acc", "persistence_acc"):
            assert abs(stored[key][metric] - ref[metric]) <= TIGHT, (key, metric)


def _eval_json(era5: dict, truth: list[str]) -> str:
    out = era5["tmp"] / "other.json"
    assert quiet(["eval", "--forecast", era5["forecast"], *truth, "--json", str(out), "--no-progress"]) == 0
    return out.read_text()


def test_a_persistence_forecast_in_another_models_conventions_reproduces_persistence_rmse(era5):
    """Written as WeatherBench 2's own files are: long names, (longitude, latitude) order, latitudes
    north first, no dchag attributes."""
    reader = ERA5Source(
        era5["path"], ["t2m", "z_500"], [], (16, 32), grid=[16, 32], split={"train": 0.75, "test": 0.25},
        split_name="test", pairs=False,
    )  # fmt: skip
    inits = reader.split_indices
    fields = reader.read_many(["t2m", "z_500"], inits)  # [N, H, W] on the run's grid, physical
    north_first = {c: v[:, ::-1].transpose(0, 2, 1)[:, None] for c, v in fields.items()}  # [N, 1, W, H]
    coords = {
        "time": reader.times[inits],
        "prediction_timedelta": np.array([6], dtype="timedelta64[h]").astype("timedelta64[ns]"),
        "longitude": reader.grid.lon,
        "latitude": reader.grid.lat[::-1],
        "level": [500],
    }
    persistence = xr.Dataset(
        {
            "2m_temperature": (("time", "prediction_timedelta", "longitude", "latitude"), north_first["t2m"]),
            "geopotential": (
                ("time", "prediction_timedelta", "level", "longitude", "latitude"),
                north_first["z_500"][:, :, None],
            ),
        },
        coords,
    )
    path = era5["tmp"] / "persistence.zarr"
    persistence.to_zarr(path, mode="w", consolidated=False)  # Zarr v3, as newer tools write
    argv = ["eval", "--forecast", str(path), "--data-path", era5["path"], "--json", str(era5["tmp"] / "p.json")]
    assert quiet([*argv, "--no-progress"]) == 0
    stored = by_key(json.loads((era5["tmp"] / "p.json").read_text()))
    reference = by_key(evaluate_forecast(era5["run"], lead_hours=[6], progress=False))
    for ours, theirs in (("t2m", "2m_temperature"), ("z_500", "geopotential_500")):
        got, ref = stored[(theirs, 6)], reference[(ours, 6)]
        assert got["samples"] == ref["samples"]
        assert close(got["rmse"], ref["persistence_rmse"]), (ours, got["rmse"], ref["persistence_rmse"])
        assert close(got["rmse"], got["persistence_rmse"], 1e-12)


def test_predicted_channels_feed_the_next_step_and_the_others_come_from_the_data_or_stay(era5, monkeypatch):
    """z_250 and z_850 are inputs the model does not predict: at each later valid time they are the data's,
    and past the end of the data they keep their last value."""
    import dchag

    trained = dchag.load(era5["run"])
    seen = []

    def recording(model, x, lead, steps, *, in_out_index, forcings=None, **kw):
        seen.append((x.clone(), [f.clone() for f in forcings or []], list(in_out_index)))
        return real(model, x, lead, steps, in_out_index=in_out_index, forcings=forcings, **kw)

    real = rollout_module.rollout
    monkeypatch.setattr(rollout_module, "rollout", recording)
    rank = rollout_module.single_process(trained)
    cfg = trained.config
    reader = rollout_module.build_source(cfg, rank.inputs, split="test", stats=trained.stats, pairs=False)
    inputs = rollout_module.FileInputs(reader, np.array([13, 14]))  # 12 h on: times 15 and 16 (past the end)
    pred = rollout_module.roll(rank, inputs, np.arange(2), 6.0, 3)
    x, forcings, index = seen[0]
    assert index == [0, 2] and pred.shape == (2, 3, 2, 16, 32)  # t2m, z_500 feed inputs 0 and 2
    data = reader.fields_at(reader.channels, np.array([14, 15]))[0]  # the data 6 h after each initialisation
    other = [1, 3]  # z_250, z_850
    torch.testing.assert_close(forcings[0][:, other], data[:, other], rtol=0, atol=0)
    torch.testing.assert_close(forcings[1][0, other], reader.fields_at(reader.channels, np.array([15]))[0][0, other])
    torch.testing.assert_close(forcings[1][1, other], data[1, other], rtol=0, atol=0)  # past the end: held


def test_the_python_api_forecasts_an_xarray_dataset_as_the_command_line_does(era5):
    import dchag

    stored = xr.open_zarr(era5["forecast"]).load()
    ds = xr.open_dataset(era5["path"])
    out = dchag.load(era5["run"]).forecast(ds.isel(time=slice(8, None)), 6, steps=3)  # forcings: the later times
    picked = out.sel(time=stored["time"].values)
    for name in stored.data_vars:
        np.testing.assert_allclose(picked[name].values, stored[name].values, rtol=1e-5, atol=1e-6)


SYNTHETIC = [
    *SMALL_MODEL,
    "data.channels=8",
    "model.hierarchy.groups=2",
    "data.num_samples=32",
    "train.batch_size=4",
    "train.steps=2",
    "data.workers=0",
]


def test_a_three_step_synthetic_rollout_at_6_h_is_scored_at_6_12_and_18_h(tmp_path, monkeypatch):
    monkeypatch.setattr(forecast_eval, "SYNTHETIC_EVAL_SAMPLES", 16)  # dchag eval --run's held-out samples
    cfg = load_config(str(ROOT / "configs/tiny-weather.yaml"), SYNTHETIC)
    with contextlib.redirect_stderr(io.StringIO()):
        train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "synthetic.zarr"
    argv = ["forecast", "--run", str(tmp_path / "run"), "--lead-hours", "6", "--steps", "3", "--out", str(out)]
    assert quiet([*argv, "--max-inits", "16"]) == 0
    ds = xr.open_zarr(out)
    assert list(ds.data_vars) == ["t2m", "u10", "v10"] and ds.sizes["time"] == 16  # our names; held-out samples
    assert ds["t2m"].attrs["units"] == "1"
    truth = ["--run", str(tmp_path / "run")]  # a synthetic run's truth: its generator
    assert quiet(["eval", "--forecast", str(out), *truth, "--json", str(tmp_path / "s.json")]) == 0
    stored = by_key(json.loads((tmp_path / "s.json").read_text()))
    assert sorted({lead for _, lead in stored}) == [6, 12, 18]
    reference = by_key(evaluate_forecast(tmp_path / "run", lead_hours=[6, 12, 18], progress=False))
    for (name, lead), ref in reference.items():
        got = stored[(name, lead)]
        assert got["samples"] == 16 and close(got["persistence_rmse"], ref["persistence_rmse"])  # the same truth
        if lead == 6:
            assert close(got["rmse"], ref["rmse"]) and abs(got["acc"] - ref["acc"]) <= TIGHT


@pytest.mark.slow
def test_a_tensor_parallel_rollout_under_torchrun_equals_the_single_process_one(era5):
    """tp=2: each rank reads its own channels, predicts its own outputs (t2m on rank 0, z_500 on rank 1)
    and rank 0 writes. `--` keeps torchrun from taking --run for its own --run-path."""
    out = era5["tmp"] / "tp2.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = ["forecast", "--", "--run", era5["run"], "--lead-hours", "6", "--steps", "3", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dchag", *argv,
         "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stderr
    single, sharded = xr.open_zarr(era5["forecast"]).load(), xr.open_zarr(out).load()
    for name in single.data_vars:
        np.testing.assert_allclose(sharded[name].values, single[name].values, rtol=1e-5, atol=1e-6)
