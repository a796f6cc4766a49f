"""The whole model builds from config for every hierarchy preset and task, and trains on one device."""

import pytest
import torch
from conftest import small_config

from dchag.bench.model_info import model_info
from dchag.model import build_model
from dchag.tasks import compute_loss

PRESETS = ["flat", "dchag-L", "dchag-C", "tree"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task", ["forecast", "mae"])
def test_every_preset_and_task_runs_forward_and_backward(preset, task):
    cfg = small_config(f"model.hierarchy.preset={preset}", f"train.task={task}")
    model = build_model(cfg)
    x = torch.randn(2, 10, 16, 32)
    batch = {"x": x, "y": torch.randn(2, len(cfg.out_channels), 16, 32), "lead_hours": torch.tensor([6.0, 48.0])}
    loss, out = compute_loss(model, batch, cfg)
    loss.backward()
    expected_channels = len(cfg.out_channels) if task == "forecast" else 10
    assert out.pred.shape == (2, expected_channels, 16, 32)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.front_end.tokenizer.weight.grad.abs().sum() > 0, "the front end must receive gradients"


def test_mae_mask_has_the_configured_ratio_and_is_set_by_the_noise():
    cfg = small_config("train.task=mae", "train.mask_ratio=0.75")
    model = build_model(cfg)
    noise = torch.rand(2, model.num_patches)
    out1 = model(torch.randn(2, 10, 16, 32), mask_noise=noise)
    out2 = model(torch.randn(2, 10, 16, 32), mask_noise=noise)
    assert out1.mask.sum(1).tolist() == [24.0, 24.0]  # 32 patches, 75% masked
    assert torch.equal(out1.mask, out2.mask)


def test_forecast_depends_on_lead_time():
    cfg = small_config()
    model = build_model(cfg).eval()
    x = torch.randn(1, 10, 16, 32)
    with torch.no_grad():
        torch.nn.init.normal_(model.lead_embed.weight)
        a, b = model(x, torch.tensor([6.0])).pred, model(x, torch.tensor([72.0])).pred
    assert not torch.allclose(a, b)


def test_info_counts_parameters_and_flops_on_the_meta_device():
    """Paper scale (1024 channels, width 2048) costs no memory: everything is on the meta device."""
    cfg = small_config(
        "data.channels=1024",
        "model.embed_dim=2048",
        "model.num_heads=32",
        "model.img_size=[128, 256]",
        "model.hierarchy.groups=8",
    )
    info = model_info(cfg)
    assert info["parameters"] > 0 and info["forward_flops"] > 0
    assert info["forward_flops_by_part"]["front_end"] > 0
    assert info["channel_tokens_bytes_fp32"] == 1024 * 2048 * 2048 * 4
