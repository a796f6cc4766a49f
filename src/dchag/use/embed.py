"""`dchag embed`: a trained encoder's features of the samples of a split, written for other tools.

The samples are those `dchag eval` scores: ERA5 runs the initialisation times of the split (pairs at the
run's shortest trained lead, which forecast encoders take as input), spectral-cube runs the split's
seeded crops (inside its tiles or files, never a training pixel), synthetic runs the held-out indices
from `data.num_samples` on. Each sample gives the encoder tokens after the ViT blocks, [L, D] (patches in
row-major order), or their mean over patches [D] with `--pool mean`.

`.npz` files hold `embedding` and the coordinates as plain numpy arrays (`np.load` needs no pickle) and
the attributes as a JSON string `attrs`; `.zarr` stores hold one xarray Dataset with the same names.
Both are written beside the target and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dchag.config import ConfigError
from dchag.data import build_source
from dchag.data.held_out import HeldOut
from dchag.data.wb2_layout import check_out as check_zarr_out
from dchag.use.trained import POOLS, TrainedModel, load_trained

DEFAULT_CROPS = 64  # spectral cubes draw crops without end: as many as `dchag eval` scores by default
FORMATS = (".npz", ".zarr")


def check_out(out: str | Path) -> Path:
    """`out` as the embeddings file to write: a .npz file, or a .zarr store (new, or an earlier one: replaced)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise ConfigError(f"--out {str(out)!r}: give a file name ending in .npz (numpy) or .zarr (xarray)")
    if out.suffix == ".zarr":
        return check_zarr_out(out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name ending in .npz")
    return out


def split_source(trained: TrainedModel, split: str | None, max_samples: int | None):
    """(source, number of samples, split name) of the samples to embed."""
    cfg, stats = trained.config, trained.stats
    kind = cfg.data.kind
    if kind.startswith("synthetic"):
        if split is not None:
            raise ConfigError(
                f"--split applies to runs on files (era5, spectral_cube); --run {str(trained.source)!r} is a {kind} "
                "run, embedded on samples from data.num_samples on, which it never trained on; leave --split out"
            )
        count = max_samples or DEFAULT_CROPS
        return HeldOut(build_source(cfg, stats=stats), cfg.data.num_samples, count), count, "held-out"
    split = split or "test"
    if kind == "era5":
        source = build_source(cfg, split=split, lead_hours=trained.default_lead_hours(), stats=stats)
        count = source.num_samples if max_samples is None else min(max_samples, source.num_samples)
        return source, count, split
    source = build_source(cfg, split=split, stats=stats)
    return source, max_samples or DEFAULT_CROPS, split


def sample_coords(source, count: int) -> dict[str, np.ndarray]:
    """Per-sample coordinates: ERA5 initialisation times; spectral-cube crop positions."""
    if hasattr(source, "pairs") and hasattr(source, "times"):  # ERA5
        return {"time": source.times[source.pairs[:count, 0]].astype("datetime64[ns]")}
    if hasattr(source, "crop"):  # spectral cube: (scene, top row, left column) of each crop
        crops = np.array([source.crop(i) for i in range(count)], dtype=np.int64).reshape(count, 3)
        return {"scene": crops[:, 0], "row": crops[:, 1], "col": crops[:, 2]}
    return {}


def embed_split(
    run: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    data_path: str | None = None,
    pool: str = "none",
    max_samples: int | None = None,
    checkpoint=None,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Write the embeddings of `split`'s samples of `run` to `out` (.npz or .zarr); returns `out`."""
    if pool not in POOLS:
        raise ConfigError(f"--pool {pool!r} is unknown; use one of {POOLS}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--max-samples {max_samples} must be >= 1")
    out = check_out(out)
    trained = load_trained(run, checkpoint, option="--run")
    if data_path is not None:
        data = dataclasses.replace(trained.config.data, path=data_path)
        trained = dataclasses.replace(trained, config=dataclasses.replace(trained.config, data=data))
    source, count, split = split_source(trained, split, max_samples)
    parts = []
    bar = tqdm(total=count, desc="embed", unit="sample", disable=not progress, file=sys.stderr)
    for start in range(0, count, batch_size):
        batch = source.batch(list(range(start, min(start + batch_size, count))))
        parts.append(trained.embed_normalised(batch["x"], pool).cpu())  # [b, L, D] or [b, D]
        bar.update(len(parts[-1]))
    bar.close()
    values = torch.cat(parts).numpy()
    gh, gw = trained.model.grid
    coords = {"sample": np.arange(count), **sample_coords(source, count)}
    if pool == "none":
        patch = np.arange(gh * gw)
        coords |= {"patch": patch, "patch_row": patch // gw, "patch_col": patch % gw}
    attrs = {
        "run": str(run),
        "step": trained.step,
        "pool": pool,
        "split": split,
        "task": trained.task,
        "channels": trained.channels,
        "patch_size": trained.config.model.patch_size,
    }
    (_write_zarr if out.suffix == ".zarr" else _write_npz)(out, values, coords, attrs)
    return out


def _write_npz(out: Path, values: np.ndarray, coords: dict, attrs: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}.npz")
    np.savez(tmp, embedding=values, attrs=np.array(json.dumps(attrs)), **coords)
    os.replace(tmp, out)


def _write_zarr(out: Path, values: np.ndarray, coords: dict, attrs: dict) -> None:
    import xarray as xr

    dims = ("sample", "patch", "feature") if values.ndim == 3 else ("sample", "feature")
    on = {"sample": ("sample",), "time": ("sample",), "scene": ("sample",), "row": ("sample",), "col": ("sample",)}
    on |= {"patch": ("patch",), "patch_row": ("patch",), "patch_col": ("patch",)}
    ds = xr.Dataset(
        {"embedding": (dims, values)},
        coords={name: (on[name], value) for name, value in coords.items()},
        attrs={k: json.dumps(v) if isinstance(v, list) else v for k, v in attrs.items()},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)  # v2, consolidated: opens without warnings
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
