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


def check_channel_keep(channel_keep, channels: int, *, values: bool = False, where: str = "the front end") -> None:
    """A one-line ValueError unless `channel_keep` is a bool tensor [C] over all `channels` of the model.
    Shape and dtype only (no host sync) unless `values`: then it must also keep at least one channel, a
    read of the mask that the public entry points afford. Under channel parallelism every rank checks the
    same (global) mask against the same C before any collective, so all ranks raise alike, none hangs."""
    if not isinstance(channel_keep, torch.Tensor):
        raise ValueError(
            f"{where} got channel_keep={channel_keep!r}; it takes a bool tensor [{channels}], one per channel"
        )
    if channel_keep.shape != (channels,):
        raise ValueError(
            f"{where} got channel_keep of shape {list(channel_keep.shape)}; it takes [{channels}], one bool per "
            f"channel of the model (all {channels}, in input order, the same on every rank)"
        )
    if channel_keep.dtype != torch.bool:
        raise ValueError(
            f"{where} got channel_keep of dtype {channel_keep.dtype}; it takes a bool mask [{channels}] "
            "(True = use the channel): pass mask.bool()"
        )
    if values and not bool(channel_keep.any()):
        raise ValueError(f"{where} got channel_keep with all {channels} channels False; keep at least one")


def drop_channels(x: torch.Tensor, channel_keep: torch.Tensor | None) -> torch.Tensor:
    """x [B, C, H, W] with the channels `channel_keep` [C] leaves out (False) set to zero, so that nothing
    in them (not even NaN) reaches the model; the aggregators also mask them out."""
    if channel_keep is None:
        return x
    if channel_keep.shape != (x.shape[1],):
        raise ValueError(f"channel_keep has shape {list(channel_keep.shape)}; expected [{x.shape[1]}], one per channel")
    return torch.where(channel_keep[None, :, None, None], x, 0.0)


def tokenize_and_aggregate(
    tokenizer: ChannelTokenizer,
    level,
    x: torch.Tensor,
    index: torch.Tensor | None,
    fused: bool,
    channel_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokenizer + first hierarchy level, [B, C, H, W] -> [B, G*k, L, D]; fused when `fused` is True.

    `index`: the vocabulary rows of x's channels, or None when x holds every row in order.
    `channel_keep` [C] (bool): the channels to use; the others are left out as if absent (None: all)."""
    x = drop_channels(x, channel_keep)
    if fused:
        weight, shift = tokenizer.channel_params(index)  # [C, D, p, p], [C, D]
        return level.forward_fused(x, weight, shift, channel_keep)
    return level(tokenizer(x, index), channel_keep)  # via tokens [B, C, L, D]


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
        tokenizer: nn.Module | None = None,
    ):
        super().__init__()
        # any tokenizer with channel_params(index) and forward(x, index) (spectral_tokenizer.py); default per-channel
        self.tokenizer = ChannelTokenizer(vocab_size, dim, patch) if tokenizer is None else tokenizer
        self.hierarchy = ChannelHierarchy(levels, len(channel_index), dim, heads, qk_norm)
        # vocabulary rows of the channels this model receives, in input order
        self.register_buffer("channel_index", torch.tensor(channel_index, dtype=torch.long), persistent=False)
        self.fused = fused_allowed(fused, self.hierarchy.levels[0])
        # the channels are the whole vocabulary in order: use the weights without an indexed copy
        self.index_is_identity = channel_index == list(range(vocab_size))

    def input_keep(self, channel_keep: torch.Tensor) -> torch.Tensor:
        """The part of a keep mask [C] over all the model's channels that belongs to x's channels (all)."""
        return channel_keep

    def forward(self, x: torch.Tensor, channel_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] -> [B, L, D]. `channel_keep` [C] (bool, at least one True): a band subset, the
        channels marked False left out as if absent (their pixels influence nothing)."""
        if channel_keep is not None:
            check_channel_keep(channel_keep, len(self.channel_index))
        index = None if self.index_is_identity else self.channel_index
        level = self.hierarchy.levels[0]
        first = tokenize_and_aggregate(self.tokenizer, level, x, index, self.fused, channel_keep)
        return self.hierarchy(first, 1, level.output_valid(channel_keep))  # [B, G*k, L, D] -> [B, L, D]
