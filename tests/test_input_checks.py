"""Bad input batches are refused with the channel that is broken, before they reach the model."""

import pytest
import torch

from dchag.train.batches import check_finite


def test_nan_in_an_input_channel_is_named():
    x = torch.zeros(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"step 7: channel 'v10' has 1 NaN/Inf"):
        check_finite({"x": x}, 7, ["t2m", "u10", "v10"])


def test_inf_in_target_is_refused():
    with pytest.raises(ValueError, match="'y'"):
        check_finite({"x": torch.zeros(1, 1, 2, 2), "y": torch.full((1, 1, 2, 2), float("inf"))}, 0, ["a"])


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
    with pytest.raises(ValueError, match="channel 'u10'"):
        train(small_config("train.steps=2"), tmp_path, progress=False)
