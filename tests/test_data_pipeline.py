"""The batch pipeline every layout shares: DataLoader workers, (rank, worker) sharding, channel-sharded
reads, the wait for data in metrics.jsonl, and `dchag eval` on a trained forecaster."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from era5_files import dataset, era5_config, write

from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.data import build_source
from dchag.data.pipeline import step_batches
from dchag.parallel.launch import spawn


@pytest.fixture(scope="module")
def era5_path(tmp_path_factory):
    return write(dataset(times=25, long_names=True), tmp_path_factory.mktemp("era5") / "wb", "folders")


def test_every_sample_of_an_epoch_is_delivered_once_across_2_ranks_x_2_workers(era5_path):
    cfg = era5_config(era5_path)
    src = build_source(cfg)
    src.stats = src.compute_stats()
    steps = src.num_samples // 4  # one epoch of a global batch of 4 (18 pairs at lead 6 h: 4 steps)
    seen, workers = Counter(), set()
    for rank in range(2):
        for batch in step_batches(src, cfg.data, 2, rank, 2, 0, steps):
            seen.update(batch["index"].tolist())
            workers.add(int(batch["worker"]))
    assert workers == {0, 1}  # both workers of each rank built batches
    assert len(seen) == steps * 4 and set(seen.values()) == {1}  # none repeated, none dropped


def test_batches_are_the_same_with_and_without_workers(era5_path):
    cfg = era5_config(era5_path)
    src = build_source(cfg)
    src.stats = src.compute_stats()
    with_workers = list(step_batches(src, cfg.data, 2, 0, 1, 0, 3))
    in_process = list(step_batches(src, load_config(None, ["data.workers=0"]).data, 2, 0, 1, 0, 3))
    for a, b in zip(with_workers, in_process):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])


def _reads_under_tp4(path) -> dict:
    from dchag.checks.parity import reference_and_parallel

    cfg = era5_config(path, "parallel.tp=4")
    _, plan = reference_and_parallel(cfg)
    src = build_source(cfg, channels=plan.input_channels)
    src.stats = src.compute_stats()
    src.batch([0, 1])
    return {
        "own": plan.input_channels,
        "outs": src.out_channels,
        "read": sorted(src.variables_read),
        "files": sorted({f.split("/")[-2] for f in src.files_opened}),
    }


def test_under_tp4_each_rank_opens_and_reads_only_its_own_variables(era5_path):
    results = spawn(_reads_under_tp4, 4, str(era5_path))
    owned = [r["own"] for r in results]
    assert owned == [["t2m"], ["z_250"], ["z_500"], ["z_850"]]
    for r in results:
        assert r["read"] == sorted(r["own"])  # inputs and (own) targets, nothing else
        assert set(r["outs"]) <= set(r["own"])
        folder = {"t2m": "2m_temperature"}.get(r["own"][0], "geopotential")
        assert r["files"] == [folder]  # the other variable's folder is never opened


def test_training_on_era5_logs_data_wait_and_eval_reports_skill_against_baselines(era5_path, tmp_path):
    from dchag.eval.forecast import evaluate_forecast
    from dchag.train.loop import train
    from dchag.train.metrics import read_metrics

    cfg = era5_config(era5_path, "train.steps=6", "train.log_every=2")
    train(cfg, tmp_path, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["data_wait_s"] >= 0 for r in records)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert set(stats["channels"]) == {"t2m", "z_250", "z_500", "z_850"} and set(stats["climatology"]) == {
        "t2m",
        "z_500",
    }

    result = evaluate_forecast(tmp_path, lead_hours=[6, 12], plots=tmp_path / "plots", progress=False)
    assert result["split"] == "test" and len(result["metrics"]) == 4
    for r in result["metrics"]:
        assert {
            "variable",
            "lead_hours",
            "samples",
            "rmse",
            "acc",
            "persistence_rmse",
            "persistence_acc",
            "climatology_rmse",
        } <= set(r)
        assert r["samples"] > 0 and r["rmse"] > 0
    t2m_6h = next(r for r in result["metrics"] if r["variable"] == "t2m" and r["lead_hours"] == 6)
    # the test field grows by 0.1 per step: persistence is off by exactly 0.1 (physical units)
    assert t2m_6h["persistence_rmse"] == pytest.approx(0.1, rel=1e-3)
    assert all(p.endswith(".png") for p in result["plots"])

    # the same run on another file holding the same variables (other layout, other names)
    other = write(dataset(times=25), tmp_path / "other.zarr", "zarr3")
    again = evaluate_forecast(tmp_path, lead_hours=[6], data_path=str(other), progress=False)
    assert [r["rmse"] for r in again["metrics"]] == pytest.approx([r["rmse"] for r in result["metrics"][:2]], rel=1e-4)

    # without its statistics the run cannot be evaluated in physical units: one line, not a traceback
    for found in tmp_path.rglob("stats.json"):
        found.unlink()
    with pytest.raises(ConfigError, match="has no normalisation statistics"):
        evaluate_forecast(tmp_path, lead_hours=[6], progress=False)


def test_eval_cli_writes_json_and_a_table(tmp_path):
    from dchag.cli import main

    cfg_args = ["--config", "configs/tiny-weather.yaml", "--set", "train.steps=2", "model.depth=1"]
    assert main(["train", *cfg_args, "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["eval", "--run", str(tmp_path), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["run"] == str(tmp_path) and doc["split"] == "held-out"
    assert {r["lead_hours"] for r in doc["metrics"]} == {6, 24}
