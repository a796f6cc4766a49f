"""`train.eval_every`: the validation loss during training is the loss `dchag.eval.validation` gives for the
same weights, under any layout (fixed held-out samples, masks and leads; chunks dealt to DP ranks)."""

from __future__ import annotations

import pytest
import yaml
from dist_workers import SMALL_MODEL
from reliability_workers import read_metrics

from dchag.configure import load_config
from dchag.eval.validation import validation_loss
from dchag.parallel.launch import spawn
from dchag.train.loop import train

TASKS = {
    "forecast": ["train.task=forecast", "data.kind=synthetic-weather"],
    # 11 channels in 5 groups: uneven groups; 12 held-out samples: the last chunk is short and, at dp 2,
    # one rank runs a weightless extra chunk to keep FSDP's collectives in step
    "mae": ["train.task=mae", "data.kind=synthetic-hyperspectral"],
}


def _config(task: str, *extra: str):
    return load_config(
        None,
        SMALL_MODEL
        + TASKS[task]
        + ["data.channels=11", "model.hierarchy.groups=5", "train.batch_size=4", "train.steps=4"]
        + ["train.eval_every=2", "train.eval_samples=20", "train.log_every=10", "data.workers=0", *extra],
    )


def _val_losses(run) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}


def _train_at_tp2_dp2(root: str) -> None:
    from pathlib import Path

    for task in TASKS:
        train(_config(task, "parallel.tp=2", "parallel.dp_shard=2"), Path(root) / task, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    spawn(_train_at_tp2_dp2, 4, str(root))
    for task in TASKS:
        train(_config(task), root / f"{task}-one", progress=False)
    return root


@pytest.mark.parametrize("task", list(TASKS))
def test_validation_during_training_is_logged_and_summarised(runs, task):
    losses = _val_losses(runs / f"{task}-one")
    assert sorted(losses) == [1, 3]  # after steps 2 and 4
    summary = yaml.safe_load((runs / f"{task}-one" / "summary.yaml").read_text())
    assert summary["final_val_loss"] == losses[3]
    assert summary["best_val_loss"] == min(losses.values())


@pytest.mark.parametrize("task", list(TASKS))
def test_validation_during_training_equals_the_eval_of_the_same_weights(runs, task):
    final = _val_losses(runs / f"{task}-one")[3]
    assert final == pytest.approx(validation_loss(runs / f"{task}-one", samples=20), rel=1e-6)
    # counter-check: another number of samples is another validation set
    assert final != pytest.approx(validation_loss(runs / f"{task}-one", samples=12), rel=1e-6)


@pytest.mark.parametrize("task", list(TASKS))
def test_validation_under_tp2_x_dp_shard2_equals_one_process(runs, task):
    one, four = _val_losses(runs / f"{task}-one"), _val_losses(runs / task)
    assert sorted(four) == sorted(one)
    for step in one:
        assert four[step] == pytest.approx(one[step], rel=1e-5)
