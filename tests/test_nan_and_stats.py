"""NaN-bearing fields (data.nan: error | mask) and the normalisation statistics: masked losses, metrics
and climatology; statistics shared out over data-parallel ranks, read chunk by chunk; stats.json reused
only for the same data (its fingerprint)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from era5_files import dataset, era5_config, land_mask, with_sea_field, write

from dchag.cli import main
from dchag.data import build_source
from dchag.data.era5 import ERA5Source
from dchag.data.errors import DataError
from dchag.parallel.launch import spawn
from dchag.tasks.forecast import lat_weighted_mse
from dchag.tasks.mae import mae_loss
from dchag.train.stats import prepare_stats

ONE_PROCESS = SimpleNamespace(distributed=False, is_main=True, dp_rank=0, dp_size=1)


def sea_config(path, *extra):
    """A small forecaster on t2m and a sea field that is NaN over land, regridded to 16 x 32."""
    channels = ["data.channels=[t2m, sst, z_500]", "data.out_channels=[t2m, sst]", "model.hierarchy.groups=2"]
    return era5_config(path, *channels, "data.workers=0", *extra)


@pytest.fixture(scope="module")
def sea_path(tmp_path_factory):
    return write(with_sea_field(dataset(times=40)), tmp_path_factory.mktemp("sea") / "sea.nc", "netcdf")


def sea_source(path, size=(19, 36), **kwargs) -> ERA5Source:
    kwargs.setdefault("split", {"train": 0.5, "test": 0.5})
    kwargs.setdefault("lead_range", (6, 6))
    return ERA5Source(str(path), ["t2m", "sst"], ["t2m", "sst"], size, **kwargs)


# ---------------------------------------------------------------------------------------------------
# data.nan


def test_a_field_with_nan_over_land_trains_with_nan_mask_and_evaluates_to_finite_metrics(sea_path, tmp_path, capsys):
    from dchag.train.loop import train

    summary = train(sea_config(sea_path, "data.nan=mask", "train.steps=4"), tmp_path / "run", progress=False)
    assert np.isfinite(summary["final_loss"]) and summary["skipped_steps"] == 0
    assert main(["eval", "--run", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert {m["variable"] for m in metrics} == {"t2m", "sst"}
    for m in metrics:
        values = [m[k] for k in ("rmse", "acc", "persistence_rmse", "persistence_acc", "climatology_rmse")]
        assert m["samples"] > 0 and np.isfinite(values).all(), m
    sst = next(m for m in metrics if m["variable"] == "sst")
    # sst = t2m + 270 where valid, and the test field grows by 0.1 per 6 h step: persistence is off by 0.1
    assert sst["persistence_rmse"] == pytest.approx(0.1, rel=1e-3)


def test_by_default_a_nan_field_is_refused_naming_the_variable_and_the_first_bad_time(tmp_path):
    path = write(with_sea_field(dataset(times=16), from_time=3), tmp_path / "late.nc", "netcdf")
    with pytest.raises(DataError) as err:
        sea_source(path).compute_stats()
    message = str(err.value)
    assert "channel 'sst' (variable 'sst') holds NaN at 2020-01-01T18:00 (time index 3)" in message, message
    assert "data.nan: mask" in message and "\n" not in message
    # counter-check: the same field without NaN passes, and data.nan=mask accepts the NaN one
    clean = write(with_sea_field(dataset(times=16), from_time=99), tmp_path / "clean.nc", "netcdf")
    assert "sst" in sea_source(clean).compute_stats()["channels"]
    assert "sst" in sea_source(path, nan="mask").compute_stats()["channels"]


def test_masked_batches_carry_validity_and_pass_the_input_guards(sea_path):
    from dchag.train.guards import findings

    src = sea_source(sea_path, nan="mask")
    src.stats = src.compute_stats()
    batch = src.batch([0, 1])
    land = torch.from_numpy(land_mask(src.grid.lat, src.grid.lon))
    assert torch.isfinite(batch["x"]).all() and torch.isfinite(batch["y"]).all()
    assert torch.equal(batch["y_valid"][:, 1], ~land.expand(2, -1, -1))  # sst: invalid exactly over land
    assert batch["y_valid"][:, 0].all() and (batch["y"][:, 1][:, land] == 0).all()
    assert not findings(batch, torch.tensor(1.0), torch.tensor(1.0)).any()
    # counter-check: the NaN the mask covers would be a finding without the mask
    unmasked = {k: v for k, v in batch.items() if not k.endswith("_valid")}
    raw = {**unmasked, "x": batch["x"].masked_fill(~batch["x_valid"], float("nan"))}
    assert findings(raw, torch.tensor(1.0), torch.tensor(1.0))[0] == 2  # 1 + channel 1 (sst)
    assert not findings({**raw, "x_valid": batch["x_valid"]}, torch.tensor(1.0), torch.tensor(1.0)).any()


def test_the_masked_forecast_loss_equals_a_hand_computed_one_and_ignores_invalid_pixels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    valid = torch.rand(2, 2, 3, 4, generator=g) > 0.3
    target = torch.where(valid, target, torch.tensor(1e6))  # whatever lies under the mask must not count
    w = torch.tensor([0.5, 1.2, 1.3])
    num = den = 0.0
    for b, c, h, x in np.ndindex(2, 2, 3, 4):
        if valid[b, c, h, x]:
            num += float(w[h]) * float(pred[b, c, h, x] - target[b, c, h, x]) ** 2
            den += float(w[h])
    pred.requires_grad_(True)
    loss = lat_weighted_mse(pred, target, w, valid)
    assert float(loss.detach()) == pytest.approx(num / den, rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[~valid] == 0).all()
    pred = pred.detach()
    # counter-check: without the mask the 1e6 values dominate
    assert float(lat_weighted_mse(pred, target, w)) > 1e9
    # with every pixel valid the masked loss is the plain one
    assert float(lat_weighted_mse(pred, target, w, torch.ones_like(valid))) == pytest.approx(
        float(lat_weighted_mse(pred, target, w)), rel=1e-6
    )


@pytest.mark.parametrize("loss_on", ["all", "masked"])
def test_the_masked_mae_loss_is_the_mean_over_valid_pixels(loss_on):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    valid = torch.rand(2, 3, 4, 4, generator=g) > 0.4
    target = torch.where(valid, target, torch.tensor(1e6))
    patch_mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])  # [B, L]: 4 patches of 2 x 2
    pixel_patch = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    num = den = 0.0
    for b, c, h, x in np.ndindex(2, 3, 4, 4):
        counted = loss_on == "all" or patch_mask[b, pixel_patch[h, x]] == 1
        if valid[b, c, h, x] and counted:
            num += float(pred[b, c, h, x] - target[b, c, h, x]) ** 2
            den += 1
    got = mae_loss(pred, target, patch_mask, 2, loss_on, valid=valid)
    assert float(got) == pytest.approx(num / den, rel=1e-6)
    assert float(mae_loss(pred, target, patch_mask, 2, loss_on)) > 1e9  # counter-check: unmasked


def test_the_climatology_divides_each_cell_by_its_count_of_valid_training_steps(tmp_path):
    path = write(with_sea_field(dataset(times=12), from_time=2), tmp_path / "d.nc", "netcdf")
    src = sea_source(path, nan="mask")  # 6 training steps; land is valid in the first 2 only
    stats = src.compute_stats(climatology=["sst"], chunk=4)
    values = np.stack([src.read("sst", np.array([t]))[0] for t in range(6)]).astype(np.float64)  # [6, H, W]
    land = land_mask(src.grid.lat, src.grid.lon)
    expected = np.where(land, values[:2].mean(0), np.nanmean(values, axis=0))
    np.testing.assert_allclose(np.array(stats["climatology"]["sst"]), expected, rtol=1e-12)
    assert stats["channels"]["sst"]["mean"] == pytest.approx(np.nanmean(values), rel=1e-12)
    # counter-check: dividing by every training step (the old rule) puts land cells a third too low
    old = np.nansum(values, axis=0) / 6
    assert not np.allclose(old[land], expected[land], rtol=1e-3)


# ---------------------------------------------------------------------------------------------------
# statistics: chunk-friendly, shared over data-parallel ranks, reused only for the same data


def test_each_variable_block_is_read_once_per_chunk_for_all_its_levels(tmp_path):
    path = write(dataset(times=12), tmp_path / "d.zarr", "zarr3")
    src = ERA5Source(
        str(path), ["t2m", "z_250", "z_500", "z_850"], ["t2m"], (19, 36), split={"train": 1.0}, lead_range=(6, 6)
    )
    src.compute_stats(chunk=4)
    assert sorted(src.read_log) == sorted((v, tuple(range(s, s + 4))) for v in ("t2m", "z") for s in (0, 4, 8))
    assert src.read("z_500", np.array([3]))[0] == pytest.approx(src.read_many(["z_500"], np.array([3]))["z_500"][0])


def _stats_under_tp2_dp2(path) -> dict:
    """tp 2 x dp_shard 2: the statistics every rank ends with, the time steps this rank read, and the
    masked forecast loss of this rank's rows and channels against the single-device model's."""
    from dchag.checks.parity import reference_and_parallel
    from dchag.tasks import compute_loss
    from dchag.train.loop import Layout

    cfg = sea_config(path, "data.nan=mask", "parallel.tp=2", "parallel.dp_shard=2")
    reference, plan = reference_and_parallel(cfg)
    layout = Layout(plan.model, plan)
    src = build_source(cfg, channels=plan.input_channels)
    stats = prepare_stats(src, layout, None)
    times = sorted({t for _, ts in src.read_log for t in ts})  # read for the statistics
    full = build_source(cfg, stats=stats)
    indices = [0, 1, 2, 3]
    weights = full.lat_weights()
    with torch.no_grad():
        ref_loss, _ = compute_loss(reference, full.batch(indices), cfg, lat_weights=weights)
        rows = indices[plan.dp_rank * 2 : plan.dp_rank * 2 + 2]
        loss, _ = compute_loss(plan.model, src.batch(rows), cfg, lat_weights=weights, channel_shard=plan.channel_shard)
    return {
        "stats": stats,
        "times": times,
        "dp_rank": plan.dp_rank,
        "loss": layout.mean_over_ranks(loss),
        "reference_loss": float(ref_loss),
    }


def test_statistics_under_dp_shard_2_equal_one_process_and_each_rank_reads_its_share(sea_path):
    results = spawn(_stats_under_tp2_dp2, 4, str(sea_path))
    cfg = sea_config(sea_path, "data.nan=mask")
    one = build_source(cfg)
    single = one.compute_stats(climatology=one.out_channels)
    for r in results:
        assert r["stats"]["fingerprint"] == json.loads(json.dumps(one.fingerprint()))
        for name, s in single["channels"].items():
            assert r["stats"]["channels"][name]["mean"] == pytest.approx(s["mean"], rel=1e-12)
            assert r["stats"]["channels"][name]["std"] == pytest.approx(s["std"], rel=1e-12)
        for name in ("t2m", "sst"):
            np.testing.assert_allclose(r["stats"]["climatology"][name], single["climatology"][name], rtol=1e-12)
        # masked loss: the mean over DP ranks of tp-sharded losses equals the single-device loss
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5)
    # 30 training steps (0.75 of 40) in chunks of 16: DP rank 0 reads the first chunk, rank 1 the second
    for r in results:
        assert r["times"] == (list(range(16)) if r["dp_rank"] == 0 else list(range(16, 30))), r["times"]


def test_statistics_are_split_over_dp_ranks_chunk_by_chunk_and_merge_to_one_process(tmp_path):
    from dchag.data.moments import merge_partials

    path = write(with_sea_field(dataset(times=40)), tmp_path / "d.nc", "netcdf")
    src = sea_source(path, nan="mask", split={"train": 1.0})
    whole = src.compute_stats(climatology=["sst"], chunk=8)
    src.read_log.clear()
    parts = [src.partial_stats(rank, 2, climatology=["sst"], chunk=8) for rank in range(2)]
    read = [ts for v, ts in src.read_log if v == "sst"]
    assert sorted(t for ts in read for t in ts) == list(range(40))  # together every step, once ...
    assert sorted(k for p in parts for k in p.chunks["sst"]) == [0, 8, 16, 24, 32]
    assert sorted(parts[0].chunks["sst"]) == [0, 16, 32] and sorted(parts[1].chunks["sst"]) == [8, 24]  # ... by share
    merged = merge_partials(parts)
    assert merged["channels"] == whole["channels"]  # chunk-ordered merge: the same numbers exactly
    np.testing.assert_allclose(merged["climatology"]["sst"], whole["climatology"]["sst"], rtol=1e-13)
    # counter-check: one rank's share alone gives other statistics
    assert merge_partials(parts[:1])["channels"]["sst"] != whole["channels"]["sst"]


def test_stats_are_reused_for_the_same_data_and_recomputed_when_path_grid_or_split_change(sea_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()

    def prepare(path=sea_path, saved=None, **kwargs):
        src = sea_source(path, tuple(kwargs.get("grid", (19, 36))), nan="mask", **kwargs)
        stats = prepare_stats(src, ONE_PROCESS, out, saved=saved)
        return stats, bool(src.read_log), capsys.readouterr().err

    first, computed, said = prepare()
    assert computed and said == "" and json.loads((out / "stats.json").read_text()) == first
    again, computed, said = prepare()
    assert not computed and said == "" and again == first  # nothing changed: reused, nothing read
    moved = shutil.copy(sea_path, tmp_path / "moved.nc")
    _, computed, said = prepare(moved)
    assert computed and said.strip() == (
        f"dchag: data.path changed ({sea_path} -> {moved}): recomputing normalisation statistics"
    )
    _, computed, said = prepare(moved, split={"train": 0.25, "test": 0.75})
    assert computed and "data.split.train changed (0.5 -> 0.25)" in said
    coarse, computed, said = prepare(moved, split={"train": 0.25, "test": 0.75}, grid=[10, 18])
    assert computed and 'data.grid changed (native -> [10, 18])' in said
    # resuming: the checkpoint's statistics are used when they describe this data, else recomputed
    _, computed, said = prepare(moved, saved=first)
    assert computed and "data.path changed" in said
    reused, computed, _ = prepare(moved, split={"train": 0.25, "test": 0.75}, grid=[10, 18], saved=coarse)
    assert not computed and reused == coarse
    # counter-check: statistics without a fingerprint (an older dchag) are not trusted
    (out / "stats.json").write_text(json.dumps({k: v for k, v in coarse.items() if k != "fingerprint"}))
    again, computed, said = prepare(moved, split={"train": 0.25, "test": 0.75}, grid=[10, 18])
    assert computed and "stats.json has no data fingerprint" in said and again == coarse


def test_a_spectral_cube_with_nan_is_refused_naming_file_and_band_or_masked_per_channel(tmp_path):
    from dchag.data.spectral_cube import SpectralCubeSource

    data = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    data[1, :2, :] = np.nan  # band 1 has no value in the first two rows
    path = tmp_path / "c.npy"
    np.save(path, data)

    def source(nan):
        return SpectralCubeSource(str(path), (8, 8), band_wavelengths=[450.0, 550.0, 650.0], num_samples=1, nan=nan)

    with pytest.raises(DataError, match=r"band 1 of '.*c.npy' holds NaN in the crop of sample 0 .*data.nan: mask"):
        source("error").compute_stats()
    src = source("mask")
    src.stats = src.compute_stats()
    assert src.stats["channels"]["b550.0"]["mean"] == pytest.approx(float(data[1, 2:].mean()), rel=1e-12)
    batch = src.batch([0])
    valid = batch["x_valid"][0]  # [C, h, w]: only band 1's first rows are invalid, the other bands stay valid
    assert not valid[1, :2].any() and valid[1, 2:].all() and valid[0].all() and valid[2].all()
    assert torch.isfinite(batch["x"]).all()


def _masked_parity_at_tp2_dp2(path) -> dict:
    """One step of the masked forecaster at tp 2 x dp_shard 2 against the single-device model, where the
    DP ranks' samples hold different numbers of valid pixels; also the naive per-rank masked mean."""
    from dchag.checks.parity import run_parity
    from dchag.tasks import compute_loss
    from dchag.train.loop import Layout

    cfg = sea_config(path, "data.nan=mask", "parallel.tp=2", "parallel.dp_shard=2")
    report = run_parity(cfg)
    # counter-check: each DP rank dividing by its own valid weight (no dp_mean) is not one device's loss
    from dchag.checks.parity import reference_and_parallel
    from dchag.data import batch_indices

    reference, plan = reference_and_parallel(cfg)
    full = build_source(cfg, stats=build_source(cfg).compute_stats())
    indices = batch_indices(full.num_samples, 4, 0, cfg.data.seed)
    weights = full.lat_weights()
    local = build_source(cfg, channels=plan.input_channels, stats=full.stats)
    rows = indices[plan.dp_rank * 2 : plan.dp_rank * 2 + 2]
    shard = plan.channel_shard
    with torch.no_grad():
        ref, _ = compute_loss(reference, full.batch(indices), cfg, lat_weights=weights)
        naive, _ = compute_loss(plan.model, local.batch(rows), cfg, lat_weights=weights, channel_shard=shard)
        exact, _ = compute_loss(
            plan.model, local.batch(rows), cfg, lat_weights=weights, channel_shard=shard, dp_mean=plan.dp_mean
        )
    layout = Layout(plan.model, plan)
    return {
        "loss_rel": report.loss_rel,
        "grad_rel": max(report.grad_rel.values()),
        "naive": layout.mean_over_ranks(naive),
        "exact": layout.mean_over_ranks(exact),
        "reference": float(ref),
    }


def test_a_masked_loss_under_data_parallelism_equals_one_device_when_ranks_hold_different_valid_counts(tmp_path):
    # land turns NaN from time 15 on: the training samples of one batch hold different valid counts
    path = write(with_sea_field(dataset(times=40), from_time=15), tmp_path / "sea.nc", "netcdf")
    results = spawn(_masked_parity_at_tp2_dp2, 4, str(path))
    for r in results:
        assert r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4, r
        assert r["exact"] == pytest.approx(r["reference"], rel=1e-5)
        assert abs(r["naive"] / r["reference"] - 1) > 1e-4, r  # the per-rank mean: 10x outside the tolerance
