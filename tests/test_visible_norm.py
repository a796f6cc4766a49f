"""`model.visible_norm`: an MAE that reads each sample's bands standardised by their visible pixels and
reconstructs in those units (reversible instance normalisation). A model that outputs zero then predicts
the mean-spectrum baseline; bands left out keep the data's units; a context-parallel rank's statistics
are the whole image's. Distributed parity (cp 2 x tp 2 with a band subset) is in
tests/test_context_parallel.py."""

from __future__ import annotations

import pytest
import torch
from einops import repeat

from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.model.model import VISIBLE_VAR_FLOOR, build_model, visible_moments

CHANNELS = 5


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its inputs and masks from a fixed seed."""
    torch.manual_seed(0)


def _config(*overrides: str):
    return load_config(
        None,
        [
            "train.task=mae",
            "model.visible_norm=true",
            f"data.channels={CHANNELS}",
            "model.img_size=[16, 16]",
            "model.embed_dim=32",
            "model.depth=1",
            "model.decoder_dim=16",
            "model.decoder_depth=1",
            *overrides,
        ],
    )


def _pixel_mask(mask: torch.Tensor, patch: int, grid_w: int) -> torch.Tensor:
    return repeat(mask, "b (h w) -> b (h p1) (w p2)", w=grid_w, p1=patch, p2=patch).bool()  # [B, H, W]


def test_a_model_that_outputs_zero_reconstructs_the_mean_spectrum_of_the_visible_pixels():
    model = build_model(_config()).double().eval()
    with torch.no_grad():
        for p in model.head.pred.parameters():
            p.zero_()
    x = torch.randn(2, CHANNELS, 16, 16, dtype=torch.float64) * 3 + 7  # [B, C, H, W]
    out = model(x, mask_noise=torch.rand(2, model.num_patches))
    masked = _pixel_mask(out.mask, 4, 4)  # [B, H, W]
    for b in range(2):
        expected = x[b][:, ~masked[b]].mean(dim=1)  # [C]: the baseline's spectrum
        assert torch.allclose(out.pred[b], expected[:, None, None].expand(-1, 16, 16), atol=1e-12)


def test_the_reconstruction_follows_a_per_band_offset_and_gain_of_the_input():
    """Shifting and scaling a band of a sample moves its reconstruction alike (up to the variance floor):
    the model never has to learn a sensor's or scene's offset and gain."""
    model = build_model(_config()).double().eval()
    x = torch.randn(2, CHANNELS, 16, 16, dtype=torch.float64)
    gain = torch.rand(2, CHANNELS, 1, 1, dtype=torch.float64) * 3 + 0.5
    offset = torch.randn(2, CHANNELS, 1, 1, dtype=torch.float64) * 5
    noise = torch.rand(2, model.num_patches)
    with torch.no_grad():
        plain, moved = model(x, mask_noise=noise).pred, model(x * gain + offset, mask_noise=noise).pred
    assert torch.allclose(moved, plain * gain + offset, atol=0.02 * gain.max().item())
    assert not torch.allclose(model(x * gain + offset, mask_noise=noise).pred, plain, atol=0.1)


def test_a_left_out_band_keeps_the_data_units_and_its_pixels_influence_nothing():
    model = build_model(_config()).double().eval()
    x = torch.randn(2, CHANNELS, 16, 16, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, True])
    noise = torch.rand(2, model.num_patches)
    changed = x.clone()
    changed[:, 1] = changed[:, 1] * 10 + 4
    with torch.no_grad():
        a = model(x, mask_noise=noise, channel_keep=keep).pred
        b = model(changed, mask_noise=noise, channel_keep=keep).pred
    assert torch.equal(a, b)
    moments = visible_moments(x, torch.zeros(2, model.num_patches), 4, keep)
    assert torch.equal(moments.shift[:, 1], torch.zeros(2, 1, 1))
    assert torch.equal(moments.scale[:, 1], torch.ones(2, 1, 1))


def test_statistics_are_the_visible_pixels_mean_and_floored_deviation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=g)
    mask = (torch.rand(4, 4, generator=g) < 0.5).double()
    mask[3] = 1.0  # a sample with every patch masked: shift 0, scale at the floor
    moments = visible_moments(x, mask, 4)
    seen = ~_pixel_mask(mask, 4, 2)
    for b in range(4):
        values = x[b][:, seen[b]] if seen[b].any() else x[b].new_zeros(2, 1)
        mean = values.mean(1)
        var = values.var(1, unbiased=False) if seen[b].any() else torch.zeros(2, dtype=torch.float64)
        assert torch.allclose(moments.shift[b, :, 0, 0].double(), mean, atol=1e-6)
        assert torch.allclose(moments.scale[b, :, 0, 0].double(), (var + VISIBLE_VAR_FLOOR).sqrt(), atol=1e-6)


def test_a_strip_s_statistics_are_the_whole_image_s_once_summed_over_the_strips():
    """What a context-parallel rank computes: its strip's sums, added over the strips, give the whole
    image's moments; a rank that forgot the sum would use its strip's own (the check can fail)."""
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    mask = (torch.rand(2, 8) < 0.5).double()  # grid 4 x 2
    mask[:, 1], mask[:, 6] = 0.0, 0.0  # each strip of each sample has a visible patch
    whole = visible_moments(x, mask, 4)
    top, bottom = (x[:, :, :8], mask[:, :4]), (x[:, :, 8:], mask[:, 4:])
    captured = []

    def capture(sums):
        captured.append(sums)
        return sums

    visible_moments(*bottom, 4, sum_over_strips=capture)
    other = captured[0]
    top_summed = visible_moments(*top, 4, sum_over_strips=lambda sums: sums + other)
    assert torch.allclose(top_summed.shift, whole.shift) and torch.allclose(top_summed.scale, whole.scale)
    top_alone = visible_moments(*top, 4)
    assert not torch.allclose(top_alone.shift, whole.shift)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.task=forecast"], "model.visible_norm=true with train.task='forecast'"),
        (["data.nan=mask"], "model.visible_norm=true with data.nan=mask"),
    ],
)
def test_visible_norm_outside_an_mae_on_complete_data_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        _config(*overrides)
    assert "\n" not in str(err.value)


def test_another_sensor_s_data_with_masked_nan_is_refused_for_a_visible_norm_run():
    """`dchag eval --data-config` / `for_channels` rebuild a run for other data without the whole-config
    validation: the same one-line refusal holds there."""
    import dataclasses

    from dchag.train.other_channels import config_for_channels

    cfg = _config("model.tokenizer=wavelength", "data.kind=synthetic-hyperspectral")
    data = dataclasses.replace(cfg.data, nan="mask")
    with pytest.raises(ConfigError, match="model.visible_norm=true with data.nan=mask"):
        config_for_channels(cfg, list(cfg.channels), data=data)
