"""Every configuration mistake is caught once, up front, with a one-line message naming the value."""

import pytest

from dchag.config import ConfigError
from dchag.configure import load_config


def error_of(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_is_named_with_the_known_alternatives():
    msg = error_of("model.embed_dimm=64")
    assert "model.embed_dimm" in msg and "embed_dim" in msg


def test_unknown_section_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    assert "train.stepz" in error_of(path=path)


def test_image_size_not_divisible_by_patch():
    msg = error_of("model.img_size=[30, 64]", "model.patch_size=4")
    assert "30" in msg and "patch_size=4" in msg


def test_channel_names_missing_from_vocabulary():
    msg = error_of("data.channels=[t2m, u10, made_up]", "model.vocabulary=[t2m, u10, v10]")
    assert "made_up" in msg and "vocabulary" in msg


def test_group_count_larger_than_channel_count():
    msg = error_of("data.channels=6", "model.hierarchy.groups=8")
    assert "groups=8" in msg and "6" in msg


def test_explicit_level_with_too_many_groups_names_its_index():
    msg = error_of(
        "data.channels=8",
        "model.hierarchy.levels=[{kind: linear, groups: 4}, {kind: cross_attention, groups: 5}, {groups: 1}]",
    )
    assert "levels[1]" in msg and "groups=5" in msg


def test_heads_not_dividing_width():
    msg = error_of("model.embed_dim=30", "model.num_heads=4")
    assert "num_heads=4" in msg and "embed_dim=30" in msg


def test_tensor_parallel_size_must_divide_heads():
    assert "parallel.tp=3" in error_of("model.num_heads=4", "parallel.tp=3")


def test_global_batch_must_split_over_data_parallel_ranks():
    assert "train.batch_size=3" in error_of("train.batch_size=3", "parallel.dp_shard=2")


def test_aggregator_heads_not_dividing_width():
    assert "hierarchy.heads=5" in error_of("model.embed_dim=32", "model.hierarchy.heads=5")


def test_hierarchy_must_end_in_one_token():
    msg = error_of("model.hierarchy.levels=[{kind: cross_attention, groups: 2}]")
    assert "1 token" in msg


def test_wrong_type_is_named():
    assert "train.steps" in error_of("train.steps=many")


def test_unknown_preset_lists_the_presets():
    msg = error_of("model.hierarchy.preset=deep")
    assert "deep" in msg and "dchag-L" in msg


def test_missing_config_file_is_named(tmp_path):
    assert "nope.yaml" in error_of(path=tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_exponents():
    cfg = load_config(
        None,
        [
            "train.lr=1e-3",
            "model.img_size=[64, 128]",
            "train.bf16=true",
            "data.channels=[t2m, u10]",
            "model.hierarchy.groups=2",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.model.img_size == [64, 128] and cfg.train.bf16
    assert cfg.channels == ["t2m", "u10"]


def test_presets_resolve_to_levels():
    from dchag.config import HierarchyConfig

    kinds = {
        p: [(lv.kind, lv.groups) for lv in HierarchyConfig(preset=p, groups=4).resolved_levels()]
        for p in ("flat", "dchag-L", "dchag-C", "tree")
    }
    assert kinds["flat"] == [("cross_attention", 1)]
    assert kinds["dchag-L"] == [("linear", 4), ("cross_attention", 1)]
    assert kinds["dchag-C"] == [("cross_attention", 4), ("cross_attention", 1)]
    assert kinds["tree"] == [("cross_attention", 8), ("cross_attention", 4), ("cross_attention", 1)]


def test_shipped_configs_validate():
    from pathlib import Path

    from dchag.use.probe_config import load_probe_config

    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        load_probe_config(path) if path.name.startswith("probe-") else load_config(path)


def test_a_torch_older_than_the_floor_is_refused_in_one_line(monkeypatch, capsys):
    import torch

    from dchag import MIN_TORCH, torch_too_old
    from dchag.cli import main

    assert MIN_TORCH == (2, 8)
    assert torch_too_old("2.13.0+cpu") is None and torch_too_old("2.8.0") is None
    assert "torch >= 2.8" in torch_too_old("2.7.1")
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert main(["info"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2.6.0" in err and ">= 2.8" in err


COMMANDS = [[], ["train"], ["export"], ["eval"], ["info"], ["bench"], ["plan"], ["check-parity"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_for_every_command_even_on_a_torch_too_old_to_train(command, monkeypatch, capsys):
    import torch

    from dchag.cli import main

    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(SystemExit) as leaving:
        main([*command, "--help"])
    assert leaving.value.code == 0
    assert "usage: dchag" in capsys.readouterr().out
