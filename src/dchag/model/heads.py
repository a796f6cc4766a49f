"""Task heads: a forecasting head (per output channel, per patch) and the MAE decoder."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dchag.model.embeddings import sincos_2d
from dchag.model.vit import Block


def unpatchify(tokens: torch.Tensor, channels: int, patch: int, grid_w: int) -> torch.Tensor:
    """[B, L, C*p*p] -> [B, C, H, W]."""
    if channels == 0:  # a tensor-parallel rank that owns no output channel: keep the (empty) graph
        b, l, _ = tokens.shape
        return tokens.reshape(b, 0, (l // grid_w) * patch, grid_w * patch)
    return rearrange(tokens, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", w=grid_w, c=channels, p1=patch, p2=patch)


class ForecastHead(nn.Module):
    """2 x (Linear + GELU) then a linear map to every output channel's p x p pixels of each patch."""

    def __init__(self, dim: int, out_channels: int, patch: int, grid_w: int):
        super().__init__()
        self.out_channels, self.patch, self.grid_w = out_channels, patch, grid_w
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(dim, out_channels * patch * patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, C_out, H, W]
        return unpatchify(self.out(self.mlp(z)), self.out_channels, self.patch, self.grid_w)


def random_masking(noise: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking from uniform noise [B, L]: the lowest-noise (1-ratio)*L patches stay.

    Returns keep indices [B, L_keep], the permutation that restores patch order [B, L], and the mask
    [B, L] (1 = masked). The caller owns the noise, so TP ranks can share it and DP ranks differ.
    """
    num_keep = max(1, int(round(noise.shape[1] * (1 - ratio))))
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones_like(noise)
    mask[:, :num_keep] = 0
    return shuffle[:, :num_keep], restore, torch.gather(mask, 1, restore)


class MAEDecoder(nn.Module):
    """Visible tokens -> narrow decoder with mask tokens -> every channel's pixels of every patch."""

    def __init__(
        self, dim: int, dec_dim: int, depth: int, heads: int, channels: int, patch: int, grid: tuple[int, int]
    ):
        super().__init__()
        self.channels, self.patch, self.grid_w, self.grid = channels, patch, grid[1], grid
        self.embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.pos_embed = nn.Parameter(sincos_2d(dec_dim, *grid)[None])  # [1, L, d]
        self.blocks = nn.ModuleList(Block(dec_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dec_dim)
        self.pred = nn.Linear(dec_dim, channels * patch * patch)

    def initial_values(self, g: torch.Generator):
        """A zero mask token and the 2-D sin-cos table as the decoder's position embedding."""
        yield "mask_token", torch.zeros(self.mask_token.shape)
        yield "pos_embed", sincos_2d(self.pos_embed.shape[-1], *self.grid)[None]

    def forward(self, visible: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """visible [B, L_keep, D], restore [B, L] -> reconstruction [B, C, H, W]."""
        x = self.embed(visible)  # [B, L_keep, d]
        b, keep, d = x.shape
        fill = self.mask_token.expand(b, restore.shape[1] - keep, d)
        x = torch.cat([x, fill], dim=1)  # [B, L, d] in shuffled order
        x = torch.gather(x, 1, restore[..., None].expand(-1, -1, d)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return unpatchify(self.pred(self.norm(x)), self.channels, self.patch, self.grid_w)
