"""The front end: per-channel tokenization plus the channel hierarchy, image [B, C, H, W] -> [B, L, D].

This is the part of the model that grows with the channel count and that D-CHAG distributes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dchag.config import LevelConfig
from dchag.model.hierarchy import ChannelHierarchy
from dchag.model.tokenizer import ChannelTokenizer


def tokenize_and_aggregate(
    tokenizer: ChannelTokenizer, level, x: torch.Tensor, index: torch.Tensor | None, fused: bool
) -> torch.Tensor:
    """Tokenizer + first hierarchy level, [B, C, H, W] -> [B, G*k, L, D]; fused when `fused` is True.

    `index`: the vocabulary rows of x's channels, or None when x holds every row in order."""
    if fused:
        weight, shift = tokenizer.channel_params(index)  # [C, D, p, p], [C, D]
        return level.forward_fused(x, weight, shift)
    return level(tokenizer(x, index))  # via tokens [B, C, L, D]


def fused_allowed(wanted: bool, level) -> bool:
    """Whether to fuse this first level; a visible warning says why not when the config asked for it."""
    reason = level.aggregator.fused_unsupported
    if wanted and reason:
        warnings.warn(
            f"dchag: model.fused_front_end is on but cannot apply: {reason}; using the materializing reference "
            "path (set model.fused_front_end=false to silence this)",
            stacklevel=2,
        )
    return wanted and reason is None


class FrontEnd(nn.Module):
    def __init__(
        self,
        channel_index: list[int],
        vocab_size: int,
        dim: int,
        patch: int,
        levels: list[LevelConfig],
        heads: int,
        qk_norm: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        self.tokenizer = ChannelTokenizer(vocab_size, dim, patch)
        self.hierarchy = ChannelHierarchy(levels, len(channel_index), dim, heads, qk_norm)
        # vocabulary rows of the channels this model receives, in input order
        self.register_buffer("channel_index", torch.tensor(channel_index, dtype=torch.long), persistent=False)
        self.fused = fused_allowed(fused, self.hierarchy.levels[0])
        # the channels are the whole vocabulary in order: use the weights without an indexed copy
        self.index_is_identity = channel_index == list(range(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, L, D]."""
        index = None if self.index_is_identity else self.channel_index
        first = tokenize_and_aggregate(self.tokenizer, self.hierarchy.levels[0], x, index, self.fused)
        return self.hierarchy(first, start_level=1)  # [B, G*k, L, D] -> [B, L, D]
