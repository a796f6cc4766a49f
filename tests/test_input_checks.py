"""Bad values stop training with a message that names what is broken (one rank: see test_tp_reliability
for the same decision taken by every rank of a distributed job)."""

import pytest
import torch

from dchag.train.guards import GRAD, INPUT, LOSS, TARGET, TrainingFailure, decide, findings, first_bad_channel


def test_first_bad_channel_is_found_without_a_host_sync():
    x = torch.zeros(2, 5, 4, 4)
    assert int(first_bad_channel(x)) == 0
    x[1, 3, 0, 0] = float("nan")
    x[0, 4, 1, 1] = float("inf")
    assert int(first_bad_channel(x)) == 4  # 1 + index of the first broken channel (3)


def test_findings_flag_input_target_loss_and_gradient_separately():
    x = torch.zeros(1, 2, 2, 2)
    batch = {"x": x, "y": torch.full((1, 1, 2, 2), float("inf")), "lead_hours": torch.tensor([6.0])}
    found = findings(batch, torch.tensor(float("nan")), torch.tensor(1.0))
    assert found.tolist()[INPUT] == 0 and found[TARGET] == 1 and found[LOSS] == 1 and found[GRAD] == 0


def test_nan_in_an_input_channel_is_named():
    x = torch.zeros(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    model = torch.nn.Linear(1, 1)
    with pytest.raises(TrainingFailure, match=r"step 7: rank 0: input channel 'v10' holds NaN/Inf.*data source"):
        decide(
            findings({"x": x}, torch.tensor(1.0), torch.tensor(1.0)), 7, ["t2m", "u10", "v10"], model, distributed=False
        )


def test_non_finite_gradient_skips_the_step_and_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = float("inf")
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    skipped = decide(
        findings({"x": torch.zeros(1, 1, 1, 1)}, torch.tensor(1.0), norm), 0, ["a"], model, distributed=False
    )
    assert skipped is not None and "non-finite gradients in 1.weight" in skipped  # skip the step, do not stop


def test_nan_batch_stops_training_with_that_message(monkeypatch, tmp_path):
    from conftest import small_config

    from dchag.data.synthetic_weather import SyntheticWeather
    from dchag.train.loop import train

    original = SyntheticWeather.batch

    def broken(self, indices):
        batch = original(self, indices)
        batch["x"][0, 1] = float("inf")
        return batch

    monkeypatch.setattr(SyntheticWeather, "batch", broken)
    with pytest.raises(TrainingFailure, match="input channel 'u10'"):
        train(small_config("train.steps=2"), tmp_path, progress=False)


def _nan_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make compute_loss return NaN at the given (0-based) calls, with finite data."""
    import dchag.train.loop as loop

    original, seen = loop.compute_loss, {"n": 0}

    def flaky(*args, **kwargs):
        loss, out = original(*args, **kwargs)
        seen["n"] += 1
        return (loss * float("nan") if seen["n"] - 1 in calls else loss), out

    monkeypatch.setattr(loop, "compute_loss", flaky)


def test_a_non_finite_loss_skips_the_step_and_is_counted(monkeypatch, tmp_path):
    import torch.distributed.checkpoint as dcp
    from conftest import small_config

    from dchag.train.checkpoint import complete_checkpoints
    from dchag.train.loop import train
    from dchag.train.metrics import read_metrics

    _nan_loss_at(monkeypatch, {2, 3})
    summary = train(
        small_config("train.steps=6", "train.log_every=10", "train.max_bad_steps=2"), tmp_path, progress=False
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3]
    assert summary["skipped_steps"] == 2 and records[-1]["skipped_steps"] == 2
    step = {"optim.step": torch.tensor(0.0)}
    with pytest.warns(UserWarning, match="single process"):  # DCP says it assumes one process: it is one
        dcp.load(step, checkpoint_id=str(complete_checkpoints(tmp_path)[-1]), no_dist=True)
    assert float(step["optim.step"]) == 4  # AdamW stepped only on the 4 sound steps


def test_more_bad_steps_than_allowed_stop_training(monkeypatch, tmp_path):
    from conftest import small_config

    from dchag.train.loop import train

    _nan_loss_at(monkeypatch, {1, 2})
    with pytest.raises(TrainingFailure, match=r"step 2: .*loss is not finite.*; 2 steps .*train.max_bad_steps=1"):
        train(small_config("train.steps=6", "train.max_bad_steps=1"), tmp_path, progress=False)


def test_the_skipped_step_count_survives_a_resume(monkeypatch, tmp_path):
    from conftest import small_config

    from dchag.train.loop import train

    cfg = small_config("train.steps=6", "train.checkpoint_every=4", "train.max_bad_steps=2")
    _nan_loss_at(monkeypatch, {2, 3})
    train(cfg, tmp_path / "first", progress=False)
    resumed = train(cfg, tmp_path / "second", progress=False, resume=str(tmp_path / "first/checkpoints/step-00000004"))
    assert resumed["skipped_steps"] == 2  # counted over the whole run: train.max_bad_steps is not reset
