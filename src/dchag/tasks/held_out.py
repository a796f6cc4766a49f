"""The training loss on held-out data, with fixed masks: one definition for validation during training
(any parallel layout), `dchag.eval.validation` and the accuracy sweep.

The held-out samples are read in chunks of `batch_size` in order; MAE masks are drawn per chunk from
(seed, 10_000 + chunk start), so every layout and every variant scores the same masked pixels. Under data
parallelism the chunks are dealt out to the data-parallel ranks; each rank runs the same number of
forward passes (a rank without a chunk left repeats one with weight 0), since FSDP's forward is collective.
"""

from __future__ import annotations

import math

import torch

from dchag.tasks.mae import mask_noise_for_step
from dchag.tasks.step import compute_loss

MASK_SEED_OFFSET = 10_000  # held-out masks never coincide with a training step's


@torch.no_grad()
def held_out_loss(
    model, cfg, source, count: int, batch_size: int, lat_weights=None, *, rank: int = 0, ranks: int = 1,
    channel_shard=None, strip=None,
) -> tuple[float, int]:  # fmt: skip
    """(sum over this rank's samples of the per-sample loss, number of those samples) over the first
    `count` samples of `source`; the model is evaluated as it is (call model.eval() first). Under context
    parallelism (`strip`) the source gives this rank's rows and the model its strip's part."""
    device = next(model.parameters()).device
    starts = list(range(0, count, batch_size))
    total, seen = 0.0, 0
    for turn in range(math.ceil(len(starts) / ranks)):
        chunk = turn * ranks + rank
        weight = 1 if chunk < len(starts) else 0  # past the end: keep the collectives in step, count nothing
        start = starts[chunk if weight else 0]
        indices = list(range(start, min(start + batch_size, count)))
        batch = {k: v.to(device) for k, v in source.batch(indices).items() if torch.is_tensor(v)}
        noise = None
        if cfg.train.task == "mae":
            noise = mask_noise_for_step(cfg, MASK_SEED_OFFSET + start, len(indices), model.num_patches).to(device)
        lat = lat_weights.to(device) if lat_weights is not None else None
        loss, _ = compute_loss(
            model, batch, cfg, lat_weights=lat, mask_noise=noise, channel_shard=channel_shard, strip=strip
        )
        total += weight * float(loss) * len(indices)
        seen += weight * len(indices)
    return total, seen
