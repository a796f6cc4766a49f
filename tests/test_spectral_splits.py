"""Spectral cubes split into train / val / test regions without leakage: the scene reader is instrumented
to record every (rows, cols) window read, and no pixel a val or test crop reads is ever read by training
(its statistics and steps), by many training crops drawn directly, or by the eval and validation sources
reading training pixels. Also: shares close to the fractions, seeded regions, whole files with
data.split_by: file, and a one-line refusal when a split gets no tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dchag.data.errors import DataError
from dchag.data.spectral_cube import ArrayReader, SpectralCubeSource, SplitRegions, allocate

WAVELENGTHS = [450.0, 550.0, 650.0, 750.0]
SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}
CROP = (16, 16)


def write_cube(path: Path, height: int = 96, width: int = 112, seed: int = 0) -> Path:
    """A [4, H, W] .npy cube of smooth positive values (so statistics and reconstructions are ordinary)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, size=(4, 1, 1))
    r, c = np.meshgrid(np.linspace(0, 3, height), np.linspace(0, 3, width), indexing="ij")
    data = base * (1.0 + 0.3 * np.sin(r + 2 * c)[None]) + 0.01 * rng.standard_normal((4, height, width))
    np.save(path, data.astype(np.float32))
    return path


@pytest.fixture
def reads(monkeypatch):
    """Every window a scene reader reads, as (file, rows, cols), in order."""
    log: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    original = ArrayReader.read

    def recording(self, bands, rows, cols):
        log.append((str(self.path), tuple(rows), tuple(cols)))
        return original(self, bands, rows, cols)

    monkeypatch.setattr(ArrayReader, "read", recording)
    return log


def footprint(windows, shape=(96, 112)) -> np.ndarray:
    """[H, W] bool: the pixels the windows cover (one scene)."""
    mask = np.zeros(shape, dtype=bool)
    for _, (r0, r1), (c0, c1) in windows:
        mask[r0:r1, c0:c1] = True
    return mask


def source(path, part="train", split=SPLIT, by="region", seed=0, crop=CROP) -> SpectralCubeSource:
    return SpectralCubeSource(
        str(path), crop, band_wavelengths=WAVELENGTHS, seed=seed, split=split, split_name=part, split_by=by
    )


def crops_footprint(src: SpectralCubeSource, count: int) -> np.ndarray:
    h, w = src.height, src.width
    mask = np.zeros((src.scenes[0].height, src.scenes[0].width), dtype=bool)
    for i in range(count):
        _, r, c = src.crop(i)
        mask[r : r + h, c : c + w] = True
    return mask


def test_no_pixel_of_a_val_or_test_crop_is_read_by_training_its_statistics_or_many_drawn_crops(tmp_path, reads):
    from dchag.cli import main
    from dchag.configure import load_config
    from dchag.data import build_source
    from dchag.eval.mae import evaluate_mae
    from dchag.eval.validation import validation_loss
    from dchag.train.loop import train

    path = write_cube(tmp_path / "c.npy")
    cfg = load_config(
        None,
        [
            "data.kind=spectral_cube", f"data.path={path}", "data.channels=all", f"data.band_wavelengths={WAVELENGTHS}",
            "data.workers=0", "data.num_samples=32", f"model.img_size={list(CROP)}", "model.patch_size=8",
            "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16",
            "model.decoder_depth=1", "model.decoder_heads=2", "model.hierarchy.preset=dchag-L",
            "model.hierarchy.groups=2", "train.task=mae", "train.steps=2", "train.batch_size=4",
            "train.warmup_steps=0", "train.log_every=1",
        ],
    )  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    trained = footprint(reads)  # statistics (32 crops) and 2 steps of 4 crops
    assert len(reads) >= 32 + 8 and trained.any()
    held = {}
    for part in ("val", "test"):
        del reads[:]
        src = build_source(cfg, split=part)
        for i in range(300):  # many crops of the part, read through the reader
            scene, r, c = src.crop(i)
            src.scenes[scene].read(src.needed, (r, r + CROP[0]), (c, c + CROP[1]))
        held[part] = footprint(reads)
        assert held[part].any()
        assert not (held[part] & trained).any(), f"training read {int((held[part] & trained).sum())} {part} pixels"
    assert not (held["val"] & held["test"]).any()
    # many more training crops, drawn directly: still none inside a val or test crop
    drawn = crops_footprint(build_source(cfg), 3000)
    assert not (drawn & (held["val"] | held["test"])).any()
    # validation reads only val pixels, `dchag eval --split test` only test pixels
    del reads[:]
    validation_loss(tmp_path / "run", samples=8, batch_size=4)
    assert not (footprint(reads) & (drawn | trained)).any() and (footprint(reads) & held["val"]).any()
    del reads[:]
    result = evaluate_mae(tmp_path / "run", split="test", samples=4, progress=False)
    assert result["split"] == "test"
    assert not (footprint(reads) & (drawn | trained)).any() and (footprint(reads) & held["test"]).any()
    assert main(["eval", "--run", str(tmp_path / "run"), "--split", "val", "--samples", "4", "--no-progress"]) == 0


def test_counter_check_the_old_index_based_held_out_crops_overlap_training(tmp_path, monkeypatch):
    """Two ways the leakage test above would fail: held-out crops as later indices over the same scene
    (the scheme before splits), and crops allowed to straddle tiles of another split."""
    path = write_cube(tmp_path / "c.npy")
    whole = source(path, split=None)
    trained = crops_footprint(whole, 512)
    held_out = np.zeros_like(trained)
    for i in range(512, 512 + 64):
        _, r, c = whole.crop(i)
        held_out[r : r + CROP[0], c : c + CROP[1]] = True
    assert (held_out & trained).sum() > 0.9 * held_out.sum()  # nearly every "held-out" pixel was trained on
    monkeypatch.setattr(SplitRegions, "covers_only", lambda *args: True)  # no check of the tiles a crop covers
    leaky = crops_footprint(source(path), 3000) & crops_footprint(source(path, "test"), 300)
    assert leaky.any()


def test_split_shares_are_close_to_the_fractions_and_whole_tiles(tmp_path):
    assert allocate([0.8, 0.1, 0.1], 10) == [8, 1, 1]
    assert allocate([0.8, 0.1, 0.1], 7) == [5, 1, 1]  # largest remainders
    assert allocate([0.8, 0.1, 0.1], 6) == [5, 1, 0]
    assert allocate([0.7, 0.0, 0.2], 9) == [6, 0, 2]  # fractions adding up to 0.9: a tenth is in no split
    regions = SplitRegions([(400, 480)], (16, 16), SPLIT, "region", 0, "here")
    area = np.zeros(3)
    rows, cols = regions.edges[0]
    heights, widths = np.diff(rows), np.diff(cols)
    assert heights.min() >= 16 and widths.min() >= 16 and rows[-1] == 400 and cols[-1] == 480
    for k in range(3):
        ty, tx = np.nonzero(regions.labels[0] == k)
        area[k] = (heights[ty] * widths[tx]).sum()
    np.testing.assert_allclose(area / area.sum(), [0.8, 0.1, 0.1], atol=0.005)


def test_the_same_seed_gives_the_same_regions_and_another_seed_other_ones(tmp_path):
    def labels(seed):
        return SplitRegions([(96, 112), (64, 64)], CROP, SPLIT, "region", seed, "here").labels

    first, again, other = labels(3), labels(3), labels(4)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not all((a == b).all() for a, b in zip(first, other))  # counter-check: the seed matters
    path = write_cube(tmp_path / "c.npy")
    a, b = source(path, "val", seed=3), source(path, "val", seed=3)
    assert [a.crop(i) for i in range(8)] == [b.crop(i) for i in range(8)]


def test_split_by_file_puts_whole_files_in_one_split(tmp_path, reads):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for k in range(10):
        write_cube(folder / f"s{k}.npy", 32, 32, seed=k)
    split = {"train": 0.6, "val": 0.2, "test": 0.2}
    files = {}
    for part in ("train", "val", "test"):
        del reads[:]
        src = source(folder, part, split=split, by="file")
        for i in range(200):
            scene, r, c = src.crop(i)
            src.scenes[scene].read(src.needed, (r, r + 16), (c, c + 16))
        files[part] = {name for name, _, _ in reads}
    assert [len(files[p]) for p in ("train", "val", "test")] == [6, 2, 2]
    assert not (files["train"] & files["val"]) and not (files["train"] & files["test"])
    assert not (files["val"] & files["test"])
    # counter-check: split by region, the same files serve every split
    by_region = {p: {source(folder, p, split=split).crop(i)[0] for i in range(200)} for p in ("train", "test")}
    assert by_region["train"] & by_region["test"]


@pytest.mark.parametrize(
    "size, split, by, message",
    [
        ((40, 48), SPLIT, "region",
         r"data.split \{'train': 0.8, 'val': 0.1, 'test': 0.1\} leaves 'test' with no tile: scene 40 x 48 holds 6 "
         r"tile\(s\) of the crop size model.img_size \[16, 16\]"),
        ((96, 112), {"train": 0.9, "test": 0.1}, "region", r"data.split \{'train': 0.9, 'test': 0.1\} has no 'val'"),
        ((96, 112), SPLIT, "file", r"leaves 'val' with no file of the 1 \(data.split_by: file\)"),
    ],
)  # fmt: skip
def test_a_split_without_a_tile_is_refused_naming_scene_crop_and_split(tmp_path, size, split, by, message):
    path = write_cube(tmp_path / "c.npy", *size)
    with pytest.raises(DataError, match=message) as err:
        source(path, "val", split=split, by=by)
    assert "\n" not in str(err.value)
    source(path, "train", split={"train": 0.5, "val": 0.25, "test": 0.25})  # counter-check: shares that fit
