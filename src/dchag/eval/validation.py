"""The validation loss of a run: its training loss, on data it never trained on, in eval mode.

File-backed runs read the `val` split (or `test` when data.split has no `val` part), never a training
pixel: ERA5, its time steps with the trained lead range; spectral cubes, crops inside the split's tiles
(or files, data.split_by: file), disjoint from every training crop. Synthetic runs: samples from
`data.num_samples` on (training draws indices below it; the generator makes every sample anew).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dchag.data.held_out import held_out_source
from dchag.eval.forecast import load_run
from dchag.tasks.held_out import held_out_loss


def validation_loss(
    run: str | Path, samples: int = 64, batch_size: int = 8, *, initial: bool = False, split: str | None = None
) -> float:
    """The loss of the run's trained model (or, with `initial`, of the model it started from: the same
    seed, before any step) on `samples` held-out samples (file-backed data: of `split`, default val)."""
    cfg, model, stats = load_run(run)
    if initial:
        from dchag.model import build_model

        torch.manual_seed(cfg.train.seed)  # as training does before building the model
        model = build_model(cfg).eval()
    source, count = held_out_source(cfg, stats, samples, split=split)
    lat = source.lat_weights() if cfg.train.task == "forecast" else None
    total, seen = held_out_loss(model, cfg, source, count, batch_size, lat)
    return float(total / seen)
