"""Band subsets: which channels a step trains on (`train.channel_subset`), and which an evaluation gives.

Training on random band subsets (ChannelViT's hierarchical channel sampling) teaches the model to work
with bands missing. The subset is one keep mask [C] per step, the same for every sample of the global
batch: the front end then masks one set of channels, exactly as it masks the padding of uneven groups,
and the fused front end still composes one filter per group. It is drawn from (train.seed, step) alone,
so every rank (TP peers, DP ranks) draws the same mask with no communication, a resumed run draws what
the uninterrupted one drew, and the result does not depend on the layout.
"""

from __future__ import annotations

import torch

from dchag.config import ConfigError


def channel_keep_for_step(cfg, step: int, num_channels: int) -> torch.Tensor | None:
    """The keep mask [C] (bool) of training step `step`, or None when the step uses every channel.

    With probability `p` the step keeps m channels, m uniform in [min, max] (max: default every channel),
    chosen uniformly without replacement; otherwise (and whenever p = 0) all of them."""
    sub = cfg.train.channel_subset
    if sub.p <= 0:
        return None
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_033 + step * 7_919 + 104_729)
    use, order = torch.rand(1, generator=g), torch.randperm(num_channels, generator=g)
    high = num_channels if sub.max is None else min(sub.max, num_channels)
    count = int(torch.randint(sub.min, high + 1, (1,), generator=g))
    if float(use) >= sub.p:
        return None
    keep = torch.zeros(num_channels, dtype=torch.bool)
    keep[order[:count]] = True
    return keep


def keep_of_names(channels: list[str], given: list[str], what: str = "channels", error=ConfigError) -> torch.Tensor:
    """The keep mask [C] over the model's `channels` of the names `given` (a subset, any order); a
    one-line `error` names any channel the model does not know, or a repeated or empty selection."""
    unknown = [c for c in given if c not in channels]
    if unknown:
        shown = ", ".join(channels[:6]) + (f", ... {len(channels)} in all" if len(channels) > 6 else "")
        raise error(f"{what} {unknown[:5]} are not channels of this model ({shown}); give a subset of them")
    if not given:
        raise error(f"{what} is empty; give at least one of the model's channels")
    repeated = sorted({c for c in given if given.count(c) > 1})
    if repeated:
        raise error(f"{what} names {repeated[:5]} more than once; give each channel once")
    keep = torch.zeros(len(channels), dtype=torch.bool)
    keep[[channels.index(c) for c in given]] = True
    return keep
