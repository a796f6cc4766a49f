"""Context parallelism alone (cp = 2, two ranks) and across checkpoints: parity with the single-device
model on both tasks, training runs that follow the one-process loss curve, and checkpoints that resume
at another cp (2 -> 1 and 1 -> 2) with the loss of the uninterrupted run.

One 2-rank gloo launch (module-scoped fixture); the one-process runs happen around it.
"""

from __future__ import annotations

from pathlib import Path

import cp_workers as CW
import pytest
import reliability_workers as RW

from dchag.checks.parity import FP32_TOLERANCE
from dchag.parallel.launch import spawn
from dchag.train.loop import train
from dchag.train.metrics import read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cp-resume"))
    train(CW.resume_config(), f"{root}/one", progress=False)  # checkpoints at steps 4 and 8
    ranks = spawn(CW.two_rank_suite, 2, root)
    train(CW.resume_config(), f"{root}/one-from-cp2", progress=False, resume=f"{root}/cp2/checkpoints/step-00000004")
    train(CW.resume_config("train.task=mae"), f"{root}/one-mae", progress=False)
    names = ("one", "cp2", "cp2-from-1", "one-from-cp2", "one-mae", "cp2-mae")
    return {
        "parity": ranks[0]["parity"],
        **{name: RW.losses(f"{root}/{name}") for name in names},
        **{f"val/{name}": _val_losses(f"{root}/{name}") for name in names},
    }


def _val_losses(run: str) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if "val_loss" in r}


def _worst(got: dict, expected: dict, steps) -> float:
    return max(abs(got[s] - expected[s]) / abs(expected[s]) for s in steps)


def test_cp2_matches_the_single_device_model_on_both_tasks(runs):
    assert len(runs["parity"]) == 2
    bad = {k: v for k, v in runs["parity"].items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad


@pytest.mark.parametrize("task", ["", "-mae"])
def test_training_at_cp2_follows_the_one_process_loss_curve(runs, task):
    """Eight AdamW steps with clipping engaged, each rank's data loader reading only its rows and the
    replicas compared every 2 steps; the validation loss (held-out data, also read in strips) too."""
    one, cp2 = runs[f"one{task}"], runs[f"cp2{task}"]
    assert sorted(cp2) == list(range(8))
    assert _worst(cp2, one, range(8)) <= 1e-5, (cp2, one)
    val_one, val_cp2 = runs[f"val/one{task}"], runs[f"val/cp2{task}"]
    assert sorted(val_cp2) == [3, 7]
    assert _worst(val_cp2, val_one, [3, 7]) <= 1e-5, (val_cp2, val_one)


def test_a_cp2_checkpoint_resumes_in_one_process_with_the_loss_of_the_uninterrupted_run(runs):
    resumed = runs["one-from-cp2"]
    assert sorted(resumed) == [4, 5, 6, 7]
    assert _worst(resumed, runs["cp2"], range(4, 8)) <= 1e-5, (resumed, runs["cp2"])


def test_a_one_process_checkpoint_resumes_at_cp2_with_the_loss_of_the_uninterrupted_run(runs):
    resumed = runs["cp2-from-1"]
    assert sorted(resumed) == [4, 5, 6, 7]
    assert _worst(resumed, runs["one"], range(4, 8)) <= 1e-5, (resumed, runs["one"])
