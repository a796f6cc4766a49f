"""The front end: per-channel tokenization plus the channel hierarchy, image [B, C, H, W] -> [B, L, D].

This is the part of the model that grows with the channel count and that D-CHAG distributes.
"""

from __future__ import annotations

import torch
from torch import nn

from dchag.config import LevelConfig
from dchag.model.hierarchy import ChannelHierarchy
from dchag.model.tokenizer import ChannelTokenizer


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
    ):
        super().__init__()
        self.tokenizer = ChannelTokenizer(vocab_size, dim, patch)
        self.hierarchy = ChannelHierarchy(levels, len(channel_index), dim, heads, qk_norm)
        # vocabulary rows of the channels this model receives, in input order
        self.register_buffer("channel_index", torch.tensor(channel_index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, L, D]."""
        tokens = self.tokenizer(x, self.channel_index)  # [B, C, L, D]
        return self.hierarchy(tokens)
