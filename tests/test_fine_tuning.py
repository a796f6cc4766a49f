"""Rollout training (`train.rollout_steps`) and fine-tuning (`train.init_from`, `train.freeze`,
`train.lr_scale`): the distributed checks run in one 2-rank launch (module-scoped fixture)."""

from __future__ import annotations

import fine_tuning_workers as FW
import numpy as np
import pytest
import torch
from era5_files import dataset, era5_config, write

import dchag.train.loop as loop
from dchag.checks.parity import FP32_TOLERANCE
from dchag.configure import load_config
from dchag.data import build_source
from dchag.data.errors import DataError
from dchag.model import build_model
from dchag.model.parts import freeze_parts, part_of
from dchag.parallel.launch import spawn
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights
from dchag.train.export import export_weights
from dchag.train.init_from import init_from
from dchag.train.optim import build_optimizer, set_lr


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 3-step MAE run on 6 channels (3 level-1 groups)."""
    root = tmp_path_factory.mktemp("fine-tuning")
    loop.train(load_config(None, FW.PRETRAIN), root / "mae", progress=False)
    return root


@pytest.fixture(scope="module")
def two(pretrained):
    return spawn(FW.two_rank_suite, 2, str(pretrained))


def _fine_tuned(pretrained, *overrides) -> tuple:
    """(config, single-device model with init_from applied, report)."""
    cfg = FW.fine_tune_config(pretrained / "mae", *overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    return cfg, model, init_from(cfg, model, None, cfg.train.init_from)


def test_rollout_training_under_tp2_has_the_single_device_loss_and_gradients(two):
    cases = {k: v for k, v in two[0]["parity"].items() if not k.startswith("fault/")}
    assert len(cases) == 3
    bad = {k: v for k, v in cases.items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad


def test_a_rollout_fed_the_data_or_the_wrong_channel_is_caught(two):
    faults = {k: v[0] for k, v in two[0]["parity"].items() if k.startswith("fault/")}
    assert len(faults) == 2 and min(faults.values()) > 1000 * FP32_TOLERANCE, faults


def test_init_from_gives_each_tp_rank_the_single_device_weights(two, pretrained):
    _, model, _ = _fine_tuned(pretrained)
    single = model.state_dict()
    parallel = two[0]["weights"]
    assert set(parallel) == set(single)
    differ = [k for k in single if not torch.equal(parallel[k], single[k])]
    assert not differ, differ


def test_mae_run_fine_tunes_into_a_forecast_run_with_two_added_channels_under_tp2(two):
    summary, report = two[0]["summary"], two[0]["report"]
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert report["new_channels"] == ["z_200", "z_250"] and report["dropped_channels"] == []
    assert {"lead_embed.weight", "head.out.weight", "front_end.hierarchy.levels.1.aggregator.wq"} <= set(report["new"])
    assert report["partial"]["front_end.tokenizer.weight"] == {"rows_loaded": 6, "rows_new": 2}
    assert report["partial"]["front_end.hierarchy.levels.0.aggregator.wq"] == {"rows_loaded": 3, "rows_new": 1}
    assert "blocks.0.attn.wq.weight" in report["loaded"] and "head.pred.weight" in report["unused"]


def test_init_from_copies_rows_by_channel_name_and_keeps_fresh_rows_fresh(pretrained):
    old = read_logical_weights(complete_checkpoints(pretrained / "mae")[-1])
    names = ["z_200", *load_config(None, FW.PRETRAIN).channels[::-1], "z_250"]  # reordered, two added
    cfg, model, _ = _fine_tuned(pretrained, f"data.channels=[{', '.join(names)}]", "model.hierarchy.groups=1")
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg).state_dict()
    new = model.state_dict()
    pre = load_config(None, FW.PRETRAIN).channels
    for key in ("weight", "channel_embed"):
        name = f"front_end.tokenizer.{key}"
        for i, channel in enumerate(names):
            expected = old[name][pre.index(channel)] if channel in pre else fresh[name][i]
            assert torch.equal(new[name][i], expected), (name, channel)
    assert torch.equal(new["blocks.0.mlp.fc1.weight"], old["blocks.0.mlp.fc1.weight"])
    # one group over other channels: the aggregator stays fresh rather than misaligned
    wk = "front_end.hierarchy.levels.0.aggregator.wk"
    assert torch.equal(new[wk], fresh[wk])


def test_an_exported_file_initialises_as_its_run_does(pretrained, tmp_path):
    exported = export_weights(pretrained / "mae", tmp_path / "mae.safetensors")
    _, from_run, _ = _fine_tuned(pretrained)
    cfg = FW.fine_tune_config(exported)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    report = init_from(cfg, model, None, exported)
    assert report.kind == "safetensors"
    a, b = model.state_dict(), from_run.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_fine_tuned_run_does_not_apply_init_from_again(pretrained, tmp_path, monkeypatch):
    cfg = FW.fine_tune_config(pretrained / "mae", "train.checkpoint_every=1")
    loop.train(cfg, tmp_path, progress=False)
    assert (tmp_path / "init_from.json").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("init_from applied on resume")

    monkeypatch.setattr(loop, "init_from", refuse)
    resumed = FW.fine_tune_config(pretrained / "mae", "train.steps=3")
    summary = loop.train(resumed, tmp_path, progress=False, resume="auto")
    assert summary["resumed_from_step"] == 2


def test_frozen_parts_stay_bit_identical_while_the_rest_trains(pretrained, tmp_path):
    cfg = FW.fine_tune_config(pretrained / "mae", "train.freeze=[front_end, blocks]", "train.steps=3")
    _, before, _ = _fine_tuned(pretrained)
    loop.train(cfg, tmp_path, progress=False)
    after = read_logical_weights(complete_checkpoints(tmp_path)[-1])
    start = before.state_dict()
    for name, value in after.items():
        frozen = part_of(name) in ("front_end", "blocks")
        assert torch.equal(value, start[name]) == frozen, name


def test_lr_scale_gives_each_part_its_share_of_the_learning_rate():
    cfg = load_config(None, FW.FINE_TUNE + ["train.lr_scale={front_end: 0.1, blocks: 0.5}", "train.freeze=[norm]"])
    model = build_model(cfg)
    freeze_parts(model, cfg.train.freeze)
    optimizer = build_optimizer(model, cfg.train)
    set_lr(optimizer, 0.02)
    part = {id(p): part_of(n) for n, p in model.named_parameters()}
    expected = {"front_end": 0.002, "blocks": 0.01}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(expected.get(part[id(p)], 0.02))
            seen.add(part[id(p)])
    assert "norm" not in seen and {"front_end", "blocks", "head"} <= seen


def test_synthetic_rollout_targets_start_with_the_one_step_target():
    cfg = load_config(None, FW.FINE_TUNE)
    one = build_source(cfg).batch([3, 5])
    three = build_source(cfg, rollout_steps=3).batch([3, 5])
    assert three["y"].shape == (2, 3, *one["y"].shape[1:])
    assert three["forcings"].shape == (2, 2, *one["x"].shape[1:])
    assert torch.equal(three["y"][:, 0], one["y"]) and torch.equal(three["x"], one["x"])


def test_era5_rollout_targets_lie_at_multiples_of_the_lead(tmp_path):
    path = write(dataset(times=12), tmp_path / "e.zarr", "zarr2")
    cfg = era5_config(path)
    stats = build_source(cfg).compute_stats()
    source = build_source(cfg, rollout_steps=3, stats=stats)
    assert source.num_samples == 6  # inputs 0..5 of the 9 training steps reach 3 leads inside the split
    batch = source.batch([0, 5])
    std = stats["channels"]["t2m"]["std"]
    step = (batch["y"][:, :, 0] - batch["x"][:, None, 0]).mean(dim=(2, 3)) * std  # t2m rises 0.1 per time step
    assert torch.allclose(step, torch.tensor([[0.1, 0.2, 0.3]] * 2), atol=1e-4)
    assert torch.allclose((batch["forcings"][:, :, 0] - batch["x"][:, None, 0]).mean(dim=(2, 3)) * std,
                          torch.tensor([[0.1, 0.2]] * 2), atol=1e-4)  # fmt: skip
    with pytest.raises(DataError, match="lower train.rollout_steps"):
        build_source(cfg, rollout_steps=9, stats=stats)
