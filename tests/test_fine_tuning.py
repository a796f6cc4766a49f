"""Rollout training (`train.rollout_steps`) and fine-tuning (`train.init_from`, `train.freeze`,
`train.lr_scale`): the distributed checks run in one 2-rank launch (module-scoped fixture, `slow`); the
FSDP2 x TP fine-tuning case runs in tests/test_tp_training_settings.py's 4-rank launch."""

from __future__ import annotations

import fine_tuning_workers as FW
import numpy as np
import pytest
import torch
import yaml
from era5_files import dataset, era5_config, write
from safetensors.torch import load_file

import dchag.train.loop as loop
from dchag.checks.parity import FP32_TOLERANCE
from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.data import build_source
from dchag.data.errors import DataError
from dchag.model import build_model
from dchag.model.parts import freeze_parts, part_of
from dchag.parallel.launch import spawn
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights
from dchag.train.export import export_folder, export_weights
from dchag.train.init_from import Pretrained, init_from
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


SAME_FRONT_END = ("data.channels=6", "model.hierarchy.groups=3")
FROZEN = "train.freeze=[front_end, blocks]"


@pytest.fixture(scope="module")
def frozen_run(pretrained):
    """A 3-step fine-tuning run of the MAE run's channels and groups (every front-end weight pretrained)
    with the front end and the ViT blocks frozen."""
    run = pretrained / "frozen"
    loop.train(FW.fine_tune_config(pretrained / "mae", *SAME_FRONT_END, FROZEN, "train.steps=3"), run, progress=False)
    return run


@pytest.mark.slow
def test_rollout_training_under_tp2_has_the_single_device_loss_and_gradients(two):
    cases = {k: v for k, v in two[0]["parity"].items() if not k.startswith("fault/")}
    assert len(cases) == 3
    bad = {k: v for k, v in cases.items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad


@pytest.mark.slow
def test_a_rollout_fed_the_data_or_the_wrong_channel_is_caught(two):
    faults = {k: v[0] for k, v in two[0]["parity"].items() if k.startswith("fault/")}
    assert len(faults) == 2 and min(faults.values()) > 1000 * FP32_TOLERANCE, faults


@pytest.mark.slow
def test_init_from_gives_each_tp_rank_the_single_device_weights(two, pretrained):
    _, model, _ = _fine_tuned(pretrained)
    single = model.state_dict()
    parallel = two[0]["weights"]
    assert set(parallel) == set(single)
    differ = [k for k in single if not torch.equal(parallel[k], single[k])]
    assert not differ, differ


@pytest.mark.slow
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


def test_init_from_reports_a_change_of_input_units_between_the_runs(pretrained, capsys):
    """A model pretrained on the data's units fine-tuned with model.visible_norm (per-sample units) loads,
    and the report and a warning say that its weights learned other input units."""
    from dchag.train.init_from import report_init

    *_, report = _fine_tuned(pretrained, *SAME_FRONT_END, "train.task=mae", "model.visible_norm=true")
    assert report.visible_norm_changed == [False, True]
    report_init(report, None)
    assert "model.visible_norm=false, this run has true" in capsys.readouterr().err
    *_, same = _fine_tuned(pretrained, *SAME_FRONT_END, "train.task=mae")
    assert same.visible_norm_changed is None


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


def test_frozen_parts_stay_bit_identical_while_the_rest_trains(pretrained, frozen_run):
    _, before, _ = _fine_tuned(pretrained, *SAME_FRONT_END, FROZEN)
    after = read_logical_weights(complete_checkpoints(frozen_run)[-1])
    start = before.state_dict()
    for name, value in after.items():
        frozen = part_of(name) in ("front_end", "blocks")
        assert torch.equal(value, start[name]) == frozen, name


def test_freezing_a_part_that_init_from_leaves_fresh_is_refused_before_reading(pretrained, monkeypatch):
    """MAE -> forecast: the forecast head is new, so freezing it would keep random weights all run; with two
    added channels the front end's level-2 aggregator is new too. Neither reads a weight."""

    def refuse(*args):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(Pretrained, "read", refuse)
    with pytest.raises(ConfigError, match=r"train.freeze=\['head'\] would keep random weights: .* has no weights for "
                       r"head\..*; leave \['head'\] out of train.freeze"):  # fmt: skip
        _fine_tuned(pretrained, "train.freeze=[head]")
    with pytest.raises(ConfigError, match=r"has no weights for front_end\.hierarchy\.levels\.1\.aggregator\."):
        _fine_tuned(pretrained, "train.freeze=[front_end]")
    with pytest.raises(ConfigError, match=r"train.freeze=\['blocks'\] without train.init_from would freeze random"):
        load_config(None, FW.FINE_TUNE + ["train.freeze=[blocks]"])


def test_freezing_a_part_with_fresh_rows_is_allowed_and_recorded_in_the_report(pretrained):
    """A spare vocabulary name the pretrained model lacks: its tokenizer rows stay fresh (and frozen)."""
    names = [*load_config(None, FW.PRETRAIN).channels, "z_200"]
    vocabulary = f"model.vocabulary=[{', '.join(names)}]"
    _, _, report = _fine_tuned(pretrained, *SAME_FRONT_END, vocabulary, "train.freeze=[front_end]")
    assert report.frozen_partial and all(n.startswith("front_end.tokenizer.") for n in report.frozen_partial)
    assert report.frozen_partial == list(report.partial)


def test_an_export_leaves_out_where_its_fine_tuning_started(frozen_run, tmp_path):
    """The exported config names no path of the training machine (train.init_from) and no train.freeze
    (refused without it), so it trains elsewhere from scratch; the model card says where the run started."""
    out = export_folder(frozen_run, tmp_path / "export")
    data = yaml.safe_load((out / "config.yaml").read_text())
    assert data["train"]["init_from"] is None and data["train"]["freeze"] == []
    assert load_config(out / "config.yaml").train.task == "forecast"  # a valid training config as it stands
    card = (out / "README.md").read_text()
    assert f"Fine-tuned from `{frozen_run.parent / 'mae'}` (train.init_from); frozen parts: front_end, blocks" in card


def test_a_linear_level_keeps_the_groups_whose_channels_stay_when_another_group_grows(tmp_path):
    """Groups 2 and 3 reduce the same channels before and after the first group gained one: they take
    their pretrained weights in their own slots, although the padded weight [G, k, n_max] grew to n_max 3."""
    source = FW.perturbed_export(FW.PRETRAIN_LINEAR, tmp_path / "linear.safetensors")
    old = load_file(source)
    cfg = FW.fine_tune_config(source, *FW.grown_first_group())
    fresh = build_model(cfg).state_dict()
    model = build_model(cfg)
    report = init_from(cfg, model, None, source)
    new = model.state_dict()
    weight, bias = "front_end.hierarchy.levels.0.aggregator.weight", "front_end.hierarchy.levels.0.aggregator.bias"
    assert old[weight].shape == (3, 1, 2) and new[weight].shape == (3, 1, 3)
    assert report.partial[weight] == report.partial[bias] == {"rows_loaded": 2, "rows_new": 1}
    assert torch.equal(new[weight][1:, :, :2], old[weight][1:]) and torch.equal(new[bias][1:], old[bias][1:])
    assert torch.equal(new[weight][0], fresh[weight][0]) and torch.equal(new[bias][0], fresh[bias][0])
    assert torch.equal(new[weight][1:, :, 2:], fresh[weight][1:, :, 2:])  # the padding stays as built (zero)


def test_lr_scale_gives_each_part_its_share_of_the_learning_rate():
    overrides = ["train.lr_scale={front_end: 0.1, blocks: 0.5}", "train.freeze=[norm]", "train.init_from=pretrained"]
    cfg = load_config(None, FW.FINE_TUNE + overrides)
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
