"""`dchag.load`, `dchag export` folders and `dchag embed`: a trained model used from outside its run.

Two tiny runs serve every test: a synthetic-weather forecast run (the reliability tests' model) and a
4-band MAE run on a small spectral cube file, so wavelengths, statistics and physical units are real.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import reliability_workers as RW
import torch
from dist_workers import SMALL_MODEL

import dchag
from dchag.cli import main
from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.data.errors import DataError
from dchag.train.loop import train

WAVELENGTHS = [450.0, 550.0, 650.0, 750.0]


@pytest.fixture(scope="module")
def forecast_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("forecast")
    train(RW.resume_config("train.steps=2", "train.checkpoint_every=1"), run, progress=False)
    return run


@pytest.fixture(scope="module")
def cube_run(tmp_path_factory) -> Path:
    """A 2-step MAE run on a 4-band 64 x 64 reflectance-like cube (values 0.1-0.9), crops of 8 x 8."""
    root = tmp_path_factory.mktemp("cube")
    g = np.random.default_rng(0)
    scale = np.array([1, 2, 3, 4], dtype=np.float32)[:, None, None]  # bands of different brightness
    cube = (0.1 + 0.8 * g.random((4, 64, 64))).astype(np.float32) * scale
    np.save(root / "cube.npy", cube)
    cfg = load_config(
        None,
        SMALL_MODEL
        + [
            "model.img_size=[8, 8]",
            "data.kind=spectral_cube",
            f"data.path={root / 'cube.npy'}",
            "data.channels=all",
            f"data.band_wavelengths={WAVELENGTHS}",
            "data.num_samples=16",
            "data.workers=0",
            "model.hierarchy.groups=2",
            "train.task=mae",
            "train.steps=2",
            "train.batch_size=2",
            "train.warmup_steps=0",
        ],
    )
    with contextlib.redirect_stderr(io.StringIO()):
        train(cfg, root / "run", progress=False)
        assert main(["eval", "--run", str(root / "run"), "--samples", "2", "--json", str(root / "run/eval.json")]) == 0
    return root / "run"


def _export(run: Path, out: Path) -> Path:
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    return out


def test_an_export_folder_predicts_exactly_as_its_run_folder(forecast_run, cube_run, tmp_path):
    run_model = dchag.load(forecast_run)
    exported = dchag.load(_export(forecast_run, tmp_path / "forecast"))
    names = sorted(p.name for p in (tmp_path / "forecast").iterdir())
    assert names == ["README.md", "config.yaml", "model.safetensors"]  # synthetic data: no stats.json
    x = torch.randn(3, len(run_model.channels), *run_model.config.model.img_size)
    lead = torch.tensor([6.0, 12.0, 24.0])
    with torch.no_grad():
        assert torch.equal(run_model.model(x, lead).pred, exported.model(x, lead).pred)
    assert (exported.channels, exported.out_channels, exported.step) == (run_model.channels, run_model.out_channels, 2)
    assert torch.equal(run_model.embed(x), exported.embed(x))
    # a spectral run: channels named from the file's wavelengths travel with the export (no data file needed)
    cube_model, cube_export = dchag.load(cube_run), dchag.load(_export(cube_run, tmp_path / "cube"))
    assert cube_export.wavelengths_nm == cube_model.wavelengths_nm == WAVELENGTHS
    assert cube_export.stats == cube_model.stats and cube_export.channels == ["b450.0", "b550.0", "b650.0", "b750.0"]
    cube = np.random.default_rng(1).uniform(0.1, 3.0, (4, 8, 8))
    assert np.array_equal(cube_model.reconstruct(cube).cube, cube_export.reconstruct(cube).cube)


def test_load_picks_a_checkpoint_by_step_and_refuses_an_unknown_one(forecast_run):
    assert dchag.load(forecast_run, checkpoint=1).step == 1 and dchag.load(forecast_run).step == 2
    with pytest.raises(ConfigError, match=r"checkpoint step 7 is not among .* \(steps \[1, 2\]\)"):
        dchag.load(forecast_run, checkpoint=7)


def test_embed_gives_tokens_per_patch_or_their_mean(forecast_run, cube_run):
    m = dchag.load(forecast_run)
    x = torch.randn(2, len(m.channels), 16, 32)
    tokens, pooled = m.embed(x), m.embed(x, pool="mean")
    assert tokens.shape == (2, 4 * 8, 32) == (2, m.model.num_patches, m.config.model.embed_dim)  # 16 x 32, patch 4
    assert torch.allclose(pooled, tokens.mean(dim=1)) and m.embed(x[0]).shape == tokens.shape[1:]
    cube = dchag.load(cube_run)
    # numpy in, numpy out; an MAE encoder embeds every patch (no masking)
    out = cube.embed(np.random.default_rng(0).uniform(0.1, 3.0, (4, 8, 8)).astype(np.float32))
    assert isinstance(out, np.ndarray) and out.shape == (cube.model.num_patches, 32)


def test_reconstruct_returns_physical_units_and_the_mask(cube_run):
    m = dchag.load(cube_run)
    cube = np.random.default_rng(2).uniform(0.1, 3.0, (2, 4, 8, 8)).astype(np.float32)
    out = m.reconstruct(cube, mask_ratio=0.5, seed=3)
    mean = np.array([m.stats["channels"][c]["mean"] for c in m.channels])[None, :, None, None]
    std = np.array([m.stats["channels"][c]["std"] for c in m.channels])[None, :, None, None]
    noise = torch.rand(2, m.model.num_patches, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = m.model(torch.from_numpy((cube - mean) / std).float(), mask_noise=noise, mask_ratio=0.5)
    assert np.allclose(out.cube, raw.pred.double().numpy() * std + mean, rtol=1e-5, atol=1e-5)
    assert out.mask.shape == (2, 8, 8) and out.patch_mask.sum() == 2 * m.model.num_patches // 2
    assert np.array_equal(out.mask[:, ::4, ::4].reshape(2, -1), out.patch_mask)
    assert np.array_equal(m.reconstruct(cube, seed=3).patch_mask, m.reconstruct(cube, seed=3).patch_mask)
    assert out.patch_mask.dtype == bool and m.reconstruct(torch.from_numpy(cube[0])).cube.shape == (4, 8, 8)


def test_inputs_are_checked_with_one_line_naming_the_value(forecast_run, cube_run):
    m, cube = dchag.load(forecast_run), dchag.load(cube_run)
    bad = [
        (lambda: cube.reconstruct(np.ones((3, 8, 8))), "cube has 3 channels; the model takes 4 (b450.0, b550.0"),
        (lambda: cube.reconstruct(np.ones((4, 9, 8))), "cube is 9 x 8 pixels; the model takes 8 x 8 (model.img_size)"),
        (lambda: cube.embed(np.full((1, 4, 8, 8), np.nan)), "x holds 256 NaN value(s), the first at [B, C, H, W]"),
        (lambda: cube.embed(np.ones((8, 8))), "x has shape [8, 8]; give [C, H, W] or [B, C, H, W]"),
        (lambda: cube.embed(np.ones((4, 8, 8)), pool="max"), "pool='max' is unknown"),
        (lambda: cube.reconstruct(np.ones((4, 8, 8)), mask_ratio=1.0), "mask_ratio=1.0 must be in [0, 1)"),
        (lambda: m.reconstruct(torch.zeros(12, 16, 32)), "reconstruct needs a masked-autoencoder run"),
        (lambda: m.normalise(torch.zeros(1, 1, 2, 2), ["sst"]), "channels ['sst'] are not channels of this model"),
        (lambda: dchag.load(forecast_run / "nope"), "does not exist; give a run folder"),
    ]
    for call, expected in bad:
        with pytest.raises(ConfigError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert issubclass(DataError, ConfigError)


def test_the_model_card_describes_channels_data_and_metrics(cube_run, forecast_run, tmp_path):
    card = (_export(cube_run, tmp_path / "cube") / "README.md").read_text()
    evaluated = json.loads((cube_run / "eval.json").read_text())
    for expected in (
        "masked-autoencoder pretraining (mask ratio 0.75",
        "preset `dchag-C`, groups 2",
        f"Parameters: {sum(p.numel() for p in dchag.load(cube_run).model.parameters()):,}",
        "| 0 | `b450.0` | 450 nm | reflectance (as the files store it) |",
        "(x - mean) / std",
        "- Licence: that of the data provider",
        f"| model | {evaluated['psnr_db']:.2f} | {evaluated['sam_deg']:.2f} |",
        "at training step 2",
    ):
        assert expected in card, expected
    weather = (_export(forecast_run, tmp_path / "weather") / "README.md").read_text()
    assert "| `z_500` | synthetic field" in weather and "no licence" in weather and "No `eval.json`" in weather
    assert "lead times 6-72 h" in weather


def test_export_refuses_a_non_empty_folder_unless_told_to_overwrite(forecast_run, tmp_path):
    out = tmp_path / "export"
    _export(forecast_run, out)
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", "--run", str(forecast_run), "--out", str(out)]) == 2
        assert main(["export", "--run", str(forecast_run), "--out", str(out), "--checkpoint", "1", "--overwrite"]) == 0
    assert dchag.load(out).step == 1 and not list(tmp_path.glob(".export*"))  # no partial folder left behind


def test_the_embed_command_writes_npz_and_zarr_with_coordinates(cube_run, forecast_run, tmp_path):
    import xarray as xr

    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["embed", "--run", str(cube_run), "--out", str(tmp_path / "e.npz"), "--max-samples", "3"]) == 0
        assert main(["embed", "--run", str(forecast_run), "--out", str(tmp_path / "e.zarr"), "--pool", "mean",
                     "--max-samples", "5", "--no-progress"]) == 0  # fmt: skip
    npz = np.load(tmp_path / "e.npz")
    assert npz["embedding"].shape == (3, 4, 32) and list(npz["patch_row"]) == [0, 0, 1, 1]
    assert npz["scene"].shape == (3,) and json.loads(str(npz["attrs"]))["split"] == "test"
    # the crops are the test split's, as dchag eval reads them: embedding them directly gives the same numbers
    m = dchag.load(cube_run)
    from dchag.data import build_source

    x = build_source(m.config, split="test", stats=m.stats).batch([0, 1, 2])["x"]
    assert np.allclose(npz["embedding"], m.embed_normalised(x).numpy(), atol=1e-6)
    ds = xr.open_zarr(tmp_path / "e.zarr")
    assert ds["embedding"].dims == ("sample", "feature") and ds["embedding"].shape == (5, 32)
    assert ds.attrs["pool"] == "mean" and ds.attrs["step"] == 2 and ds.attrs["split"] == "held-out"
    # a .zarr target is checked as dchag forecast checks its store: an earlier store is replaced, another folder refused
    (tmp_path / "other.zarr").mkdir()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["embed", "--run", str(forecast_run), "--out", str(tmp_path / "e.zarr"), "--max-samples", "2",
                     "--pool", "mean", "--no-progress"]) == 0  # fmt: skip
        assert main(["embed", "--run", str(forecast_run), "--out", str(tmp_path / "other.zarr")]) == 2
    assert xr.open_zarr(tmp_path / "e.zarr")["embedding"].shape == (2, 32)
    assert "exists and is not a Zarr store; give a new path (FILE.zarr)" in err.getvalue()


def test_the_documented_python_example_runs(tmp_path, monkeypatch):
    """The `dchag.load` example of README.md and docs/use.md, on shrunk runs of the two presets it names."""
    from test_shipped_configs import shrink_overrides

    root = Path(__file__).parents[1]
    blocks = {
        doc: [b for b in re.findall(r"```python\n(.*?)```", (root / doc).read_text(), re.S) if "dchag.load(" in b]
        for doc in ("README.md", "docs/use.md")
    }
    assert all(blocks.values()), blocks
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stderr(io.StringIO()):
        for preset, out in (("sentinel2-mae", "runs/s2"), ("era5-sample", "runs/era5-sample")):
            config = root / "configs" / f"{preset}.yaml"
            train(load_config(config, [*shrink_overrides(config), "data.workers=0"]), tmp_path / out, progress=False)
    for doc, found in blocks.items():
        for code in found:
            scope: dict = {}
            exec(compile(code, doc, "exec"), scope)
    assert scope["out"].cube.shape == scope["cube"].shape and scope["forecast"].sizes["prediction_timedelta"] == 3
