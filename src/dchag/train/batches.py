"""Input checks on a batch before it reaches the model."""

from __future__ import annotations

import torch


def check_finite(batch: dict, step: int, channels: list[str]) -> None:
    """Raise a one-line error naming the first input channel that holds NaN or Inf."""
    x = batch["x"]
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        per_channel = bad.sum(dim=(0, 2, 3))  # [C]
        c = int(per_channel.nonzero()[0, 0])
        name = channels[c] if c < len(channels) else str(c)
        raise ValueError(
            f"input batch at step {step}: channel {name!r} has {int(per_channel[c])} NaN/Inf values; "
            "fix or mask the data source"
        )
    for key in ("y", "lead_hours"):
        if key in batch and not bool(torch.isfinite(batch[key]).all()):
            raise ValueError(f"input batch at step {step}: {key!r} has NaN/Inf values; fix the data source")
