"""The validation loss of a run: its training loss, on data it never trained on, in eval mode.

File-backed runs read the `val` split (or `test` when data.split has no `val` part), never a training
pixel: ERA5, its time steps with the trained lead range; spectral cubes, crops inside the split's tiles
(or files, data.split_by: file), disjoint from every training crop. Synthetic runs: samples from
`data.num_samples` on (training draws indices below it; the generator makes every sample anew).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dchag.data import build_source
from dchag.eval.forecast import HeldOut, load_run
from dchag.tasks import compute_loss, mask_noise_for_step


def held_out_split(cfg) -> str:
    """The split validation reads: `val`, or `test` when data.split gives `val` no part."""
    return "val" if cfg.data.split.get("val") else "test"


def validation_loss(run: str | Path, samples: int = 64, batch_size: int = 8, *, initial: bool = False) -> float:
    """The loss of the run's trained model (or, with `initial`, of the model it started from: the same
    seed, before any step) on `samples` held-out samples."""
    cfg, model, stats = load_run(run)
    if initial:
        from dchag.model import build_model

        torch.manual_seed(cfg.train.seed)  # as training does before building the model
        model = build_model(cfg).eval()
    if cfg.data.kind in ("era5", "spectral_cube"):
        split = held_out_split(cfg)
        source = build_source(cfg, split=split, stats=stats)
        count = min(samples, source.num_samples) if cfg.data.kind == "era5" else samples  # a cube has crops to spare
    else:
        source = HeldOut(build_source(cfg, stats=stats), cfg.data.num_samples, samples)
        count = samples
    lat = source.lat_weights() if cfg.train.task == "forecast" else None
    total, seen = 0.0, 0
    for start in range(0, count, batch_size):
        indices = list(range(start, min(start + batch_size, count)))
        batch = source.batch(indices)
        noise = None
        if cfg.train.task == "mae":  # fixed masks per batch: every variant sees the same ones
            noise = mask_noise_for_step(cfg, 10_000 + start, len(indices), model.num_patches)
        with torch.no_grad():
            loss, _ = compute_loss(model, batch, cfg, lat_weights=lat, mask_noise=noise)
        total += float(loss) * len(indices)
        seen += len(indices)
    return total / seen
