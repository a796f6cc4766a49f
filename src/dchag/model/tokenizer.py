"""Per-channel patch embedding with one weight per channel name, computed for all channels in one op."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dchag.model.embeddings import sincos_1d


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, L, p*p] with L = (H/p)(W/p), patches in row-major order."""
    return rearrange(x, "b c (h p1) (w p2) -> b c (h w) (p1 p2)", p1=patch, p2=patch)


def tokens_from_params(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, patch: int) -> torch.Tensor:
    """x [B, C, H, W], weight [C, D, p, p], shift [C, D] -> tokens [B, C, L, D] (the reference path)."""
    patches = patchify(x, patch)  # [B, C, L, p*p]
    tokens = torch.einsum("bclk,cdk->bcld", patches, rearrange(weight, "c d p1 p2 -> c d (p1 p2)"))  # [B, C, L, D]
    return tokens + shift[None, :, None, :]


class ChannelTokenizer(nn.Module):
    """Tokenizes each channel with its own patch embedding and adds that channel's embedding.

    Weights are stacked over a vocabulary of channel names, `weight [V, D, p, p]`, `bias [V, D]`,
    `channel_embed [V, D]`; a forward call takes the vocabulary indices of the channels it receives.
    """

    def __init__(self, vocab_size: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, patch, patch))
        self.bias = nn.Parameter(torch.zeros(vocab_size, dim))
        self.channel_embed = nn.Parameter(torch.empty(vocab_size, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return  # shapes only: a rank building its shards fills in the values (parallel/construct.py)
        for name, value in self.initial_values(torch.default_generator):
            getattr(self, name).copy_(value)

    def initial_values(self, g: torch.Generator):
        """Weights N(0, 0.02) truncated, zero biases, sin-cos channel embeddings (see model.init)."""
        from dchag.model.init import trunc_normal

        yield "weight", trunc_normal(self.weight.shape, g)
        yield "bias", torch.zeros(self.bias.shape)
        yield "channel_embed", sincos_1d(self.weight.shape[1], torch.arange(self.weight.shape[0])).float()

    def channel_params(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [C, D, p, p] and the per-channel additive term bias + embedding [C, D] of the
        vocabulary rows `index` (None: every row, in order, without copying the weight)."""
        if index is None:
            return self.weight, self.bias + self.channel_embed
        return self.weight[index], self.bias[index] + self.channel_embed[index]

    def forward(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """x [B, C, H, W], index [C] (or None for all rows) -> tokens [B, C, L, D]."""
        return tokens_from_params(x, *self.channel_params(index), self.patch)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    by_name = ("weight", "bias", "channel_embed")

    def row_params(self, rows) -> dict[str, torch.Tensor]:
        """{parameter: its rows for vocabulary rows `rows`}: every parameter is one row per name."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return {name: rows for name in self.by_name}

    def rows(self, rows) -> "ChannelTokenizer":
        """A tokenizer holding only vocabulary rows `rows` (copies; on the meta device, shapes only)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        local = ChannelTokenizer(len(rows), self.weight.shape[1], self.patch).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            for name in self.by_name:
                getattr(local, name).copy_(getattr(self, name)[rows.to(self.weight.device)])
        return local
