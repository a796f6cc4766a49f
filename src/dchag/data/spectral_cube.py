"""Hyperspectral and multispectral cubes from files, with a wavelength per band.

One source for every format, each read by its field's library: ENVI `.hdr` + binary in BSQ/BIL/BIP
(`spectral`), multi-band GeoTIFF / JPEG2000 and one-file-per-band rasters at any mix of resolutions
(`rasterio`), MATLAB `.mat` v5 (`scipy.io`) and v7.3 (`h5py`), HDF5 (`h5py`), `.npy` / `.npz`. A folder
or glob of cube files is one dataset of several scenes; a folder of single-band rasters is one scene.

A sample is a crop of `model.img_size` at a seeded position inside its split's region (`data.split`,
`data.split_by`: tiles of each scene, or whole files, drawn to train / val / test). Reads are windowed: a
sample reads its crop of the bands it needs, so a tensor-parallel rank reads only its own bands.
Channels are named by wavelength (`b664.6`), so sensors share vocabulary rows where their bands
coincide. docs/data.md describes selection, resampling, statistics and no-data handling.
"""

from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from dchag.config import SPLITS
from dchag.data.errors import DataError
from dchag.data.moments import Partial, merge_partials
from dchag.data.packaged import resolve_path

# central wavelengths (nm) of Sentinel-2A's bands, used when band files are named like s2_B04.jp2
SENTINEL2_NM = {
    "B01": 442.7, "B02": 492.4, "B03": 559.8, "B04": 664.6, "B05": 704.1, "B06": 740.5, "B07": 782.8,
    "B08": 832.8, "B8A": 864.7, "B09": 945.1, "B10": 1373.5, "B11": 1613.7, "B12": 2202.4,
}  # fmt: skip
# central wavelengths (nm) of Landsat 8's OLI (B1-B9) and TIRS (B10, B11) bands, for band files named like
# LC08_L1TP_..._B4.TIF or l8_B4.tif
LANDSAT8_NM = {
    "B1": 443.0, "B2": 482.0, "B3": 561.4, "B4": 654.6, "B5": 864.6, "B6": 1608.9, "B7": 2200.7, "B8": 589.5,
    "B9": 1373.4, "B10": 10895.0, "B11": 12005.0,
}  # fmt: skip
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")
CUBE_SUFFIXES = (".hdr", ".mat", ".h5", ".hdf5", ".he5", ".npy", ".npz", *RASTER_SUFFIXES)


def band_name(nm: float) -> str:
    """The channel name of a band at `nm` nanometres (as the synthetic hyperspectral source names them)."""
    return f"b{nm:.1f}"


def _to_nm(values, units: str | None) -> list[float]:
    scale = {"micrometers": 1e3, "micrometer": 1e3, "um": 1e3, "microns": 1e3, "micron": 1e3, "µm": 1e3}.get(
        (units or "nm").strip().lower(), 1.0
    )
    return [float(v) * scale for v in values]


# ---------------------------------------------------------------------------------------------------
# readers: bands, height, width, wavelengths (nm or None), nodata, read(bands, rows, cols) -> [k, h, w]


class EnviReader:
    def __init__(self, path: Path):
        from spectral.io import envi

        try:
            self.img = envi.open(str(path))
        except (envi.EnviDataFileNotFoundError, envi.FileNotFoundError) as err:
            raise DataError(f"ENVI header {str(path)!r}: its data file is missing ({err})") from None
        except Exception as err:  # spectral raises its own exception kinds for bad headers and sizes
            raise DataError(f"ENVI header {str(path)!r}: cannot be read ({type(err).__name__}: {err})") from None
        self.path = path
        self.height, self.width, self.bands = self.img.shape
        expected = self.height * self.width * self.bands * self.img.sample_size + self.img.offset
        actual = Path(self.img.filename).stat().st_size
        if actual < expected:
            raise DataError(
                f"ENVI header {str(path)!r}: the data file {self.img.filename!r} holds {actual} bytes, the header "
                f"describes {expected} ({self.height} x {self.width} x {self.bands}); fix the header or the file"
            )
        meta = self.img.metadata
        self.wavelengths = _to_nm(meta["wavelength"], meta.get("wavelength units")) if "wavelength" in meta else None
        ignore = meta.get("data ignore value")
        self.nodata = float(ignore) if ignore is not None else None

    def read(self, bands, rows, cols) -> np.ndarray:
        block = self.img.read_subregion(rows, cols, list(bands))  # [h, w, k]
        return np.moveaxis(np.asarray(block, dtype=np.float32), -1, 0)


class RasterReader:
    """A multi-band raster file, or single-band files of one scene (resampled to the finest grid)."""

    def __init__(self, paths: list[Path], wavelengths: list[float] | None):
        import rasterio

        self.datasets = [rasterio.open(p) for p in paths]
        self.paths = paths
        if len(paths) == 1:
            ds = self.datasets[0]
            self.bands, self.height, self.width = ds.count, ds.height, ds.width
            self.layers = [(0, b + 1) for b in range(ds.count)]  # (dataset, band index)
        else:
            counts = {ds.count for ds in self.datasets}
            if counts != {1}:
                raise DataError(f"data.path: a folder of band files must hold single-band rasters ({paths[0].parent})")
            self.bands = len(paths)
            self.height = max(ds.height for ds in self.datasets)
            self.width = max(ds.width for ds in self.datasets)
            self.layers = [(i, 1) for i in range(len(paths))]
        nodata = {ds.nodata for ds in self.datasets} - {None}
        self.nodata = float(nodata.pop()) if nodata else None
        self.wavelengths = wavelengths

    def read(self, bands, rows, cols) -> np.ndarray:
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        out = []
        h, w = rows[1] - rows[0], cols[1] - cols[0]
        for b in bands:
            k, index = self.layers[b]
            ds = self.datasets[k]
            sy, sx = ds.height / self.height, ds.width / self.width  # this band's pixels per scene pixel
            window = Window(cols[0] * sx, rows[0] * sy, w * sx, h * sy)
            out.append(ds.read(index, window=window, out_shape=(h, w), resampling=Resampling.bilinear))
        return np.stack(out).astype(np.float32)


class ArrayReader:
    """A numpy-like array [C, H, W] (after `layout`): .npy (memory-mapped), .npz, HDF5 / .mat v7.3 (h5py,
    sliced lazily), .mat v5 (scipy.io, loaded once)."""

    def __init__(self, path: Path, variable: str | None, layout: str | None, wavelengths):
        self.path, self.wavelengths, self.nodata = path, wavelengths, None
        suffix = path.suffix.lower()
        if suffix == ".npy":
            array, default = np.load(path, mmap_mode="r"), "chw"
        elif suffix == ".npz":
            with np.load(path) as archive:
                name = variable or archive.files[0]
                if name not in archive.files:
                    raise DataError(f"{str(path)!r}: no array {name!r} (it has {archive.files})")
                array = archive[name]
            default = "chw"
        elif suffix == ".mat" and not _is_hdf5(path):
            import scipy.io

            names = [n for n, *_ in scipy.io.whosmat(path)]
            name = variable or (names[0] if len(names) == 1 else None)
            if name not in names:
                raise DataError(f"{str(path)!r}: no variable {variable!r} in this .mat file (it has {names})")
            array, default = scipy.io.loadmat(path, variable_names=[name])[name], "hwc"
        else:  # HDF5, including MATLAB v7.3
            import h5py

            handle = h5py.File(path, "r")
            datasets = [k for k, v in handle.items() if isinstance(v, h5py.Dataset)]
            cubes = [k for k in datasets if handle[k].ndim == 3]
            name = variable or (cubes[0] if len(cubes) == 1 else None)
            if name is None or name not in handle:
                raise DataError(f"{str(path)!r}: no dataset {variable!r} (it has {datasets}); set data.variable")
            array = handle[name]
            # MATLAB v7.3 stores column-major: h5py sees [C, W, H] for a MATLAB [H, W, C] array
            default = "cwh" if suffix == ".mat" else "chw"
            if "wavelength" in handle and wavelengths is None:
                self.wavelengths = [float(v) for v in np.asarray(handle["wavelength"]).ravel()]
        self.layout = layout or default
        if array.ndim != 3 or sorted(self.layout) != ["c", "h", "w"]:
            raise DataError(f"{str(path)!r}: expected a 3-D cube with layout {self.layout!r}, got shape {array.shape}")
        self.array = array
        size = dict(zip(self.layout, array.shape))
        self.bands, self.height, self.width = size["c"], size["h"], size["w"]

    def read(self, bands, rows, cols) -> np.ndarray:
        index = {"c": sorted(set(bands)), "h": slice(*rows), "w": slice(*cols)}
        block = np.asarray(self.array[tuple(index[a] for a in self.layout)], dtype=np.float32)
        block = np.transpose(block, [self.layout.index(a) for a in "chw"])  # [k, h, w]
        order = {b: i for i, b in enumerate(index["c"])}
        return block[[order[b] for b in bands]]


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n" or (f.seek(512) == 512 and f.read(8) == b"\x89HDF\r\n\x1a\n")


def _sentinel2_nm(path: Path) -> float | None:
    match = re.search(r"B(0[1-9]|1[0-2]|8A)", path.stem.upper())
    return SENTINEL2_NM.get(match.group(0)) if match else None


def _band_file_nm(path: Path) -> float | None:
    """The central wavelength of a single-band file named after its sensor's band: Landsat 8 (a name that
    starts L8 / LC08 / LC8 / LO08 and ends _B<n>; its B10 is not Sentinel-2's B10), else Sentinel-2."""
    landsat = re.fullmatch(r"(?:L8|LC08|LC8|LO08)\w*_B(\d{1,2})", path.stem.upper())
    if landsat:
        return LANDSAT8_NM.get(f"B{int(landsat.group(1))}")
    return _sentinel2_nm(path)


def open_scenes(path: str, variable=None, layout=None, wavelengths=None) -> list:
    """Readers for the scenes at `path` (a file, a folder or a glob)."""
    path = resolve_path(path)
    p = Path(path)
    files = [p] if p.is_file() else sorted(Path(f) for f in glob.glob(str(p / "*") if p.is_dir() else path))
    files = [f for f in files if f.suffix.lower() in CUBE_SUFFIXES and "preview" not in f.stem.lower()]
    if not files:
        raise DataError(f"data.path {path!r}: no cube files ({', '.join(CUBE_SUFFIXES)}) found there")
    rasters = [f for f in files if f.suffix.lower() in RASTER_SUFFIXES]
    if rasters and len(rasters) == len(files) and len(files) > 1 and _single_band(rasters):
        nm = [_band_file_nm(f) for f in rasters]
        if wavelengths is None and all(v is not None for v in nm):
            order = np.argsort(nm)
            rasters, wavelengths = [rasters[i] for i in order], [nm[i] for i in order]
        return [RasterReader(rasters, wavelengths)]
    scenes = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".hdr":
            scenes.append(EnviReader(f))
        elif suffix in RASTER_SUFFIXES:
            scenes.append(RasterReader([f], wavelengths))
        else:
            scenes.append(ArrayReader(f, variable, layout, wavelengths))
    counts = {s.bands for s in scenes}
    if len(counts) > 1:
        detail = ", ".join(f"{getattr(s, 'path', '?')}: {s.bands}" for s in scenes[:4])
        raise DataError(f"data.path {path!r}: the files hold unequal band counts ({detail}); one dataset, one band set")
    return scenes


def _single_band(paths) -> bool:
    import rasterio

    for p in paths:
        with rasterio.open(p) as ds:
            if ds.count != 1:
                return False
    return True


# ---------------------------------------------------------------------------------------------------
# band selection


def select_bands(wavelengths: list[float], bands=None, wavelength_range=None, resample=None, where=""):
    """(channel names, interpolation matrix [C, n] over the file's bands) for a band index list, a
    wavelength range, or resampling to `resample = {start, stop, count}` nm (linear over the spectrum)."""
    n = len(wavelengths)
    wl = np.asarray(wavelengths, dtype=np.float64)
    if resample:
        target = np.linspace(float(resample["start"]), float(resample["stop"]), int(resample["count"]))
        if target.min() < wl.min() - 1e-6 or target.max() > wl.max() + 1e-6:
            raise DataError(
                f"{where}: data.wavelengths {target.min():g}-{target.max():g} nm lies outside the file's "
                f"{wl.min():g}-{wl.max():g} nm"
            )
        order = np.argsort(wl)
        matrix = np.zeros((len(target), n))
        for i, t in enumerate(target):  # linear interpolation weights between the two neighbouring bands
            j = int(np.clip(np.searchsorted(wl[order], t), 1, n - 1))
            lo, hi = order[j - 1], order[j]
            frac = 0.0 if wl[hi] == wl[lo] else (t - wl[lo]) / (wl[hi] - wl[lo])
            matrix[i, lo] += 1 - frac
            matrix[i, hi] += frac
        return [band_name(t) for t in target], matrix
    if wavelength_range:
        low, high = wavelength_range
        chosen = [i for i in range(n) if low <= wl[i] <= high]
        if not chosen:
            raise DataError(
                f"{where}: data.wavelength_range [{low:g}, {high:g}] nm holds no band of the file "
                f"({wl.min():g}-{wl.max():g} nm)"
            )
    elif bands is not None:
        bad = [b for b in bands if not 0 <= b < n]
        if bad:
            raise DataError(f"{where}: data.bands {bad} are outside the file's {n} bands")
        chosen = list(bands)
    else:
        chosen = list(range(n))
    return [band_name(wl[i]) for i in chosen], np.eye(n)[chosen]


# ---------------------------------------------------------------------------------------------------
# train / val / test regions: every crop lies inside the region of its split


_REGION_STREAM = 7919  # seeds the draw of tiles (or files) to splits, apart from the crop positions


def allocate(fractions: list[float], n: int) -> list[int]:
    """How many of `n` tiles (or files) each part gets: floor(f * n), the rest by largest remainder
    (ties to the earlier part), round(sum(f) * n) in all, so the shares are as close to the fractions as
    whole tiles allow."""
    exact = [f * n for f in fractions]
    counts = [math.floor(e + 1e-9) for e in exact]
    total = min(n, math.floor(sum(exact) + 0.5 + 1e-9))
    order = sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])  # largest remainder first, stable
    for k in order[: max(0, total - sum(counts))]:
        counts[k] += 1
    return counts


def tile_edges(size: int, crop: int) -> np.ndarray:
    """Edges of size // crop tiles along one axis [n + 1], as even as whole pixels allow: every tile is
    at least one crop wide, and together they cover the axis."""
    n = size // crop
    return (np.arange(n + 1) * size) // n


class SplitRegions:
    """Which scene pixels serve which split, and where a crop of that split may lie.

    region: each scene is cut into tiles of one crop (model.img_size, remainders spread over the tiles);
    a seeded draw (data.seed) gives each split round(fraction x tiles) of all scenes' tiles. A crop of a
    split covers only tiles of that split (at most 2 x 2 of them, as tiles are at least one crop wide),
    so no pixel a val or test crop reads is ever read by a training crop.
    file: the same draw over whole files (scenes); a crop lies anywhere in a file of its split."""

    def __init__(self, sizes: list[tuple[int, int]], crop: tuple[int, int], fractions: dict, by: str, seed: int, where):
        self.crop, self.by = crop, by
        h, w = crop
        if by == "file":
            shapes = [(1, 1)] * len(sizes)
            self.edges = [(np.array([0, H]), np.array([0, W])) for H, W in sizes]
        else:
            shapes = [(H // h, W // w) for H, W in sizes]
            self.edges = [(tile_edges(H, h), tile_edges(W, w)) for H, W in sizes]
        n = sum(a * b for a, b in shapes)
        counts = allocate([float(fractions.get(s, 0)) for s in SPLITS], n)
        for part, count in zip(SPLITS, counts):
            if fractions.get(part, 0) > 0 and count == 0:
                raise DataError(_empty_part_message(where, fractions, part, by, sizes, crop, n))
        labels = np.full(n, -1, dtype=np.int8)  # index into SPLITS; -1: in no split (fractions add up to < 1)
        order = np.random.default_rng([seed, _REGION_STREAM]).permutation(n)
        labels[order[: sum(counts)]] = np.repeat(np.arange(len(SPLITS)), counts)
        bounds = np.cumsum([0] + [a * b for a, b in shapes])
        self.labels = [labels[bounds[k] : bounds[k + 1]].reshape(shapes[k]) for k in range(len(sizes))]
        self.sizes = sizes

    def tiles(self, part: str) -> np.ndarray:
        """[n, 3] (scene, tile row, tile column) of every tile of `part`."""
        found = []
        for scene, labels in enumerate(self.labels):
            rows, cols = np.nonzero(labels == SPLITS.index(part))
            found.append(np.column_stack([np.full(len(rows), scene), rows, cols]))
        return np.concatenate(found).astype(np.int64)

    def covers_only(self, scene: int, row: int, col: int, part: str) -> bool:
        """True when the crop at (row, col) of `scene` covers only tiles of `part`."""
        rows, cols = self.edges[scene]
        h, w = self.crop
        r0, r1 = np.searchsorted(rows, [row, row + h - 1], side="right") - 1
        c0, c1 = np.searchsorted(cols, [col, col + w - 1], side="right") - 1
        return bool((self.labels[scene][r0 : r1 + 1, c0 : c1 + 1] == SPLITS.index(part)).all())

    def draw(self, g: np.random.Generator, tiles: np.ndarray, part: str) -> tuple[int, int, int]:
        """(scene, row, column) of a crop of `part`: a seeded tile of the part, then a position of a crop
        that overlaps it, redrawn while it covers a tile of another split; after 8 tries a position inside
        the tile (always allowed: tiles are at least one crop wide)."""
        scene, ty, tx = (int(v) for v in tiles[g.integers(len(tiles))])
        (H, W), (h, w) = self.sizes[scene], self.crop
        rows, cols = self.edges[scene]
        top, bottom, left, right = int(rows[ty]), int(rows[ty + 1]), int(cols[tx]), int(cols[tx + 1])
        for _ in range(8):
            r = int(g.integers(max(0, top - h + 1), min(H - h, bottom - 1) + 1))
            c = int(g.integers(max(0, left - w + 1), min(W - w, right - 1) + 1))
            if self.covers_only(scene, r, c, part):
                return scene, r, c
        return scene, int(g.integers(top, bottom - h + 1)), int(g.integers(left, right - w + 1))


def _empty_part_message(where, fractions, part, by, sizes, crop, n) -> str:
    if by == "file":
        return (
            f"{where}: data.split {fractions} leaves {part!r} with no file of the {n} (data.split_by: file); "
            f"give more files, or data.split_by: region"
        )
    shown = ", ".join(f"{H} x {W}" for H, W in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
    return (
        f"{where}: data.split {fractions} leaves {part!r} with no tile: scene {shown} holds {n} tile(s) of the "
        f"crop size model.img_size {list(crop)}; lower model.img_size, raise the {part!r} fraction, or leave "
        f"{part!r} out of data.split"
    )


# ---------------------------------------------------------------------------------------------------
# the source


class SpectralCubeSource:
    """`batch(indices)` -> x [B, C, h, w]: crops of the selected bands, normalised per band.

    `rows` (set on a copy by `data/row_strip.py` for a context-parallel rank): `batch` reads and holds
    only those rows of each crop, a sub-window of the crop's; statistics read whole crops."""

    rows: slice | None = None  # the crop's pixel rows `batch` serves (a context-parallel strip); None: all

    def __init__(
        self,
        path: str,
        img_size: tuple[int, int],
        *,
        channels: list[str] | None = None,
        bands=None,
        wavelength_range=None,
        resample=None,
        band_wavelengths=None,
        variable=None,
        layout=None,
        nodata=None,
        seed: int = 0,
        num_samples: int = 512,
        stats: dict | None = None,
        nan: str = "error",
        split: dict | None = None,
        split_name: str = "train",
        split_by: str = "region",
    ):
        self.path = str(path)
        self.nan = nan  # "error": NaN that is not the no-data value is refused; "mask": masked out
        self._selection = {
            "bands": bands, "wavelength_range": wavelength_range, "wavelengths": resample,
            "band_wavelengths": band_wavelengths, "variable": variable, "layout": layout,
        }  # fmt: skip
        where = f"data.path {self.path!r}"
        self._open_args = (self.path, variable, layout, band_wavelengths)
        self._scenes, self._pid = open_scenes(*self._open_args), os.getpid()
        first = self.scenes[0]
        wavelengths = band_wavelengths or first.wavelengths
        if wavelengths is None:
            raise DataError(f"{where}: the files state no wavelengths; give data.band_wavelengths (nm, one per band)")
        if len(wavelengths) != first.bands:
            raise DataError(f"{where}: {len(wavelengths)} wavelengths for {first.bands} bands")
        self.all_channels, matrix = select_bands(wavelengths, bands, wavelength_range, resample, where)
        self.channels = list(channels) if channels is not None else list(self.all_channels)
        missing = [c for c in self.channels if c not in self.all_channels]
        if missing:
            raise DataError(f"{where}: channels {missing[:5]} are not among the selected bands")
        rows = [self.all_channels.index(c) for c in self.channels]
        self.matrix = matrix[rows]  # [C, n]: this source's channels from the file's bands
        self.needed = sorted({int(j) for j in np.nonzero(np.abs(self.matrix).sum(0))[0]})
        self.out_channels: list[str] = []
        self.height, self.width = img_size
        small = [s for s in self.scenes if s.height < self.height or s.width < self.width]
        if small:
            raise DataError(
                f"{where}: crops of model.img_size {list(img_size)} are larger than a scene of "
                f"{small[0].height} x {small[0].width} pixels; lower model.img_size"
            )
        self.nodata = nodata if nodata is not None else first.nodata
        self.seed, self.num_samples, self.stats = seed, num_samples, stats
        # split None: crops anywhere (a source built directly); else only inside split_name's region
        self.split, self.split_name, self.split_by, self.regions = split, split_name, split_by, None
        if split is not None:
            sizes = [(s.height, s.width) for s in self.scenes]
            self.regions = SplitRegions(sizes, tuple(img_size), split, split_by, seed, where)
            if not float(split.get(split_name, 0)) > 0:
                raise DataError(f"{where}: data.split {split} has no {split_name!r} part; evaluate another split")
            self._tiles = self.regions.tiles(split_name)  # [n, 3] (scene, tile row, tile column)
        self.bands_read: set[int] = set()

    @property
    def scenes(self) -> list:
        """The readers, opened anew in each process (file handles do not survive a fork)."""
        if self._pid != os.getpid():
            self._scenes, self._pid = open_scenes(*self._open_args), os.getpid()
        return self._scenes

    def crop(self, index: int) -> tuple[int, int, int]:
        """(scene, row, column) of sample `index` of this source's split, from a generator seeded by
        (seed, split, index); without a split, anywhere in a seeded scene."""
        if self.regions is not None:
            g = np.random.default_rng([self.seed, 1 + SPLITS.index(self.split_name), index])
            return self.regions.draw(g, self._tiles, self.split_name)
        g = np.random.default_rng([self.seed, index])
        scene = int(g.integers(len(self.scenes)))
        s = self.scenes[scene]
        return scene, int(g.integers(s.height - self.height + 1)), int(g.integers(s.width - self.width + 1))

    def read_crop(self, index: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Physical values [C, h, w] of sample `index` and their validity [C, h, w] (False: no-data, or NaN
        under data.nan=mask, in any band the channel is made of; such values are 0). Per channel, so a
        tensor-parallel rank, which reads only its own bands, finds what one device finds. `rows`: only
        those rows of the crop are read ([C, h_rows, w]); a crop that is all no-data is then not refused,
        since another strip of it may hold data (the statistics' crops are still checked whole)."""
        scene, crop_row, c = self.crop(index)
        start, stop, _ = (rows if rows is not None else slice(None)).indices(self.height)
        r, height = crop_row + start, stop - start
        reader = self.scenes[scene]
        raw = reader.read(self.needed, (r, r + height), (c, c + self.width))  # [n_needed, h, w]
        self.bands_read.update(self.needed)
        finite = np.isfinite(raw)
        nodata_is_nan = self.nodata is not None and math.isnan(self.nodata)
        if self.nan == "error" and not nodata_is_nan and not finite.all():
            k = int(np.argmax(~finite.reshape(len(raw), -1).all(axis=1)))
            band = self.needed[k]
            raise DataError(
                f"data.path {self.path!r}: band {band} of {scene_file(reader, band)!r} holds NaN in the crop of sample "
                f"{index} (rows {r}-{r + height}, columns {c}-{c + self.width}); set data.nan: mask to mask NaN "
                "pixels out of the loss and the metrics, or data.nodata: .nan to treat them as no-data"
            )
        bad = ~finite
        if self.nodata is not None and not nodata_is_nan:
            bad |= raw == self.nodata
        support = (np.abs(self.matrix[:, self.needed]) > 0).astype(np.float32)  # [C, n_needed]
        valid = np.einsum("cn,nhw->chw", support, bad.astype(np.float32)) == 0  # [C, h, w]
        if rows is None and not valid.any():
            raise DataError(
                f"data.path {self.path!r}: the crop of sample {index} (scene {scene}, rows {r}-{r + height}, "
                f"columns {c}-{c + self.width}) is all no-data; lower model.img_size or set data.nodata"
            )
        values = np.einsum("cn,nhw->chw", self.matrix[:, self.needed], np.where(bad, 0.0, raw))
        return np.where(valid, values, 0.0).astype(np.float32), valid

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """x [B, C, h, w] normalised, no-data values at the band mean (0); under data.nan=mask also
        x_valid [B, C, h, w] (bool), which takes them out of the loss and the metrics."""
        if self.stats is None:
            raise RuntimeError("normalisation statistics are not set: call compute_stats() or pass stats=")
        mean = np.array([self.stats["channels"][c]["mean"] for c in self.channels], dtype=np.float32)
        std = np.array([self.stats["channels"][c]["std"] for c in self.channels], dtype=np.float32)
        crops, masks = [], []
        for i in indices:
            values, valid = self.read_crop(i, self.rows)
            normed = (values - mean[:, None, None]) / std[:, None, None]
            crops.append(np.where(valid, normed, 0.0))  # no-data pixels sit at the band mean
            masks.append(valid)
        batch = {"x": torch.from_numpy(np.stack(crops).astype(np.float32))}
        if self.nan == "mask":
            batch["x_valid"] = torch.from_numpy(np.stack(masks))
        return batch

    def fingerprint(self) -> dict:
        """What the statistics depend on besides the channels: a run folder's stats.json is reused only
        when this matches (docs/data.md)."""
        return {
            "kind": "spectral_cube",
            "path": os.path.abspath(resolve_path(self.path)),
            **self._selection,
            "crop": [self.height, self.width],
            "seed": self.seed,
            "split": self.split,  # the training region depends on every fraction, the seed and the crop size
            "split_by": self.split_by if self.split is not None else None,
            "stat_crops": min(self.num_samples, 64),
            "nodata": self.nodata,
            "nan": self.nan,
        }

    def partial_stats(self, share: int = 0, shares: int = 1, channels=None, climatology=None, samples=None) -> Partial:
        """This data-parallel rank's part of the statistics: crops share, share + shares, ... of the first
        min(num_samples, 64) crops of this source's split (training: the train region only). A refused crop
        is recorded (the merge raises the first)."""
        channels = self.channels if channels is None else channels
        part = Partial(f"data.path {self.path!r}", share)
        for i in range(min(self.num_samples, samples or 64))[share::shares]:
            try:
                values, valid = self.read_crop(i)
            except DataError as err:
                part.refuse((i,), str(err))
                break
            v = values.astype(np.float64)  # [C, h, w]
            n = valid.sum(axis=(1, 2))
            mean = np.where(valid, v, 0.0).sum(axis=(1, 2)) / np.maximum(n, 1)
            m2 = (np.where(valid, v - mean[:, None, None], 0.0) ** 2).sum(axis=(1, 2))
            for k, name in enumerate(self.channels):
                if name in channels:
                    part.chunks.setdefault(name, {})[i] = (int(n[k]), float(mean[k]), float(m2[k]))
        return part

    def compute_stats(self, channels=None, climatology=None, samples: int | None = None) -> dict:
        """Per-channel mean and standard deviation over the training crops (streamed crop by crop, float64,
        no-data excluded)."""
        return merge_partials([self.partial_stats(0, 1, channels, climatology, samples)])

    def lat_weights(self) -> torch.Tensor:
        return torch.ones(self.height)


def scene_file(reader, band: int) -> str:
    """The file that holds `band` of a scene (one file per band, or one cube file)."""
    paths = getattr(reader, "paths", None)
    if paths:
        return str(paths[band] if len(paths) > 1 else paths[0])
    return str(getattr(reader, "path", "?"))


_NAMES_CACHE: dict = {}


def selected_channels(data_cfg) -> list[str]:
    """The channel names `data.channels: all` stands for: the selected bands of the files (cached)."""
    import json

    key = json.dumps(
        [data_cfg.path, data_cfg.bands, data_cfg.wavelength_range, data_cfg.wavelengths, data_cfg.band_wavelengths,
         data_cfg.variable, data_cfg.layout],
        default=str,
    )  # fmt: skip
    if key not in _NAMES_CACHE:
        scenes = open_scenes(data_cfg.path, data_cfg.variable, data_cfg.layout, data_cfg.band_wavelengths)
        wavelengths = data_cfg.band_wavelengths or scenes[0].wavelengths
        if wavelengths is None:
            raise DataError(
                f"data.path {data_cfg.path!r}: the files state no wavelengths; give data.band_wavelengths (nm)"
            )
        where = f"data.path {data_cfg.path!r}"
        names, _ = select_bands(wavelengths, data_cfg.bands, data_cfg.wavelength_range, data_cfg.wavelengths, where)
        _NAMES_CACHE[key] = names
    return list(_NAMES_CACHE[key])
