"""`dchag train` on one process: outputs, loss falling for every preset, the shipped tiny presets."""

import json
from pathlib import Path

import pytest
from conftest import small_config

from dchag.cli import main
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights, read_train_state
from dchag.train.loop import train
from dchag.train.metrics import read_metrics

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("preset", ["flat", "dchag-L", "dchag-C", "tree"])
def test_loss_falls_for_every_hierarchy_preset(preset, tmp_path):
    cfg = small_config(
        f"model.hierarchy.preset={preset}",
        "train.steps=60",
        "train.lr=2e-3",
        "train.warmup_steps=5",
        "train.log_every=5",
        "train.batch_size=4",
    )
    summary = train(cfg, tmp_path, progress=False)
    assert summary["final_loss"] < 0.8 * summary["first_loss"]


def test_train_writes_metrics_config_and_a_loadable_checkpoint(tmp_path):
    rc = main(
        [
            "train",
            "--config",
            str(ROOT / "configs/tiny-weather.yaml"),
            "--out",
            str(tmp_path),
            "--no-progress",
            "--set",
            "train.steps=3",
            "train.log_every=1",
        ]
    )
    assert rc == 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2] and all("loss" in r for r in records)
    assert (tmp_path / "config.yaml").is_file()
    (checkpoint,) = complete_checkpoints(tmp_path)
    assert read_train_state(checkpoint)["step"] == 3
    assert "front_end.tokenizer.weight" in read_logical_weights(checkpoint)


def test_config_error_exits_2_with_one_line(capsys):
    assert main(["train", "--set", "model.num_heads=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_heads=3" in err


def test_shipped_tiny_hyperspectral_preset_halves_its_loss(tmp_path):
    rc = main(
        ["train", "--config", str(ROOT / "configs/tiny-hyperspectral.yaml"), "--out", str(tmp_path), "--no-progress"]
    )
    assert rc == 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["loss"] <= 0.5 * records[0]["loss"], json.dumps(records)


@pytest.mark.slow  # the preset's full 600 steps
def test_shipped_tiny_weather_preset_is_20_percent_below_persistence_in_its_own_run(tmp_path):
    """The forecaster (it predicts the change from the input) starts at persistence's error; after its own
    steps, on held-out samples, the mean over variables and trained leads of model / persistence RMSE is at
    most 0.80 (measured 0.45, docs/data.md; 0.91 with the 300 steps and D-CHAG-C it had before)."""
    from dchag.eval.forecast import evaluate_forecast

    rc = main(["train", "--config", str(ROOT / "configs/tiny-weather.yaml"), "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    metrics = evaluate_forecast(tmp_path, progress=False)["metrics"]
    assert {r["lead_hours"] for r in metrics} == {6, 24}  # the leads it trains on
    ratio = sum(r["rmse"] / r["persistence_rmse"] for r in metrics) / len(metrics)
    assert ratio <= 0.80, metrics
