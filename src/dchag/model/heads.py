"""Task heads: a forecasting head (per output channel, per patch) and the MAE decoder."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dchag.model.channel_encoding import FEATURES, HYPER_HIDDEN, ChannelEncoder, ChannelTable, by_name_table, mix_rows
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


@dataclass
class MaskLayout:
    """An MAE mask as the model uses it, for the L patch tokens it computes (all of them on one device)."""

    visible: torch.Tensor  # [B, n]: the positions among the L tokens of those the encoder sees, in its order
    slots: torch.Tensor  # [B, L]: each token's row among the encoder's n outputs; n (the mask token) if masked
    mask: torch.Tensor  # [B, L]: 1 = masked


def mask_layout(noise: torch.Tensor, ratio: float) -> MaskLayout:
    """One device's mask from uniform noise [B, L] (`random_masking`): the encoder sees the kept patches
    in shuffled order, so a visible patch's row is its place in that order."""
    keep, restore, mask = random_masking(noise, ratio)
    return MaskLayout(keep, restore.clamp(max=keep.shape[1]), mask)


class MAEDecoder(nn.Module):
    """Visible tokens -> narrow decoder with mask tokens -> every channel's pixels of every patch."""

    def __init__(
        self,
        dim: int,
        dec_dim: int,
        depth: int,
        heads: int,
        channels: int,
        patch: int,
        grid: tuple[int, int],
        pred: nn.Module | None = None,
    ):
        super().__init__()
        self.channels, self.patch, self.grid_w, self.grid = channels, patch, grid[1], grid
        self.embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.pos_embed = nn.Parameter(sincos_2d(dec_dim, *grid)[None])  # [1, L, d]
        self.blocks = nn.ModuleList(Block(dec_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dec_dim)
        # [B, L, d] -> [B, L, C*p*p]: per channel by name, or conditioned on wavelengths (ConditionedPixelOutput)
        self.pred = nn.Linear(dec_dim, channels * patch * patch) if pred is None else pred

    def initial_values(self, g: torch.Generator):
        """A zero mask token and the 2-D sin-cos table as the decoder's position embedding."""
        yield "mask_token", torch.zeros(self.mask_token.shape)
        yield "pos_embed", sincos_2d(self.pos_embed.shape[-1], *self.grid)[None]

    def forward(self, latent: torch.Tensor, slots: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """The encoder's visible tokens latent [B, n, D] and `MaskLayout.slots` [B, L] of the patches at
        `positions` (all of them; a context-parallel rank's strip) -> reconstruction per patch
        [B, L, C*p*p] (the loss reads this layout; `image` turns it into [B, C, H, W])."""
        return self.decode(self.assemble(latent, slots, positions))

    def assemble(self, latent: torch.Tensor, slots: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """The decoder's tokens [B, L, d] of the patches at `positions`: each visible one's embedded latent,
        the mask token for the others, plus their position embedding."""
        x = self.embed(latent)  # [B, n, d]
        b, _, d = x.shape
        x = torch.cat([x, self.mask_token.expand(b, 1, d)], dim=1)  # [B, n + 1, d]: row n is the mask token
        x = torch.gather(x, 1, slots[..., None].expand(-1, -1, d))  # [B, L, d]
        return x + self.pos_embed[:, positions]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens in order [B, L, d] (visible and mask tokens, positions added) -> reconstruction
        per patch [B, L, C*p*p]."""
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))

    def image(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, L, C*p*p] -> [B, C, H, W]."""
        return unpatchify(patches, self.channels, self.patch, self.grid_w)


class ConditionedPixelOutput(nn.Module):
    """The MAE decoder's last projection, [B, L, d] -> [B, L, C*p*p], with each channel's output weights
    [p*p, d] and bias [p*p] generated from its wavelength encoding (named channels: learned rows by
    name), so a model reconstructs any channels, also of a sensor it never saw. Weights are generated
    only for the channels it outputs (under channel parallelism: a rank's own). Drop-in for the
    per-channel `nn.Linear(d, C*p*p)`: the same output layout."""

    def __init__(self, specs: list, names: list[str], dec_dim: int, patch: int):
        """`specs`: the output channels'; `names`: the rows of the by-name tables (the vocabulary's named
        channels)."""
        super().__init__()
        self.pixels, self.dec_dim = patch * patch, dec_dim
        self.table = ChannelTable(specs, names)
        self.generate = ChannelEncoder(FEATURES, HYPER_HIDDEN, self.pixels * (dec_dim + 1), out_std=0.02)
        self.name_weight = by_name_table(len(names), self.pixels, dec_dim)
        self.name_bias = by_name_table(len(names), self.pixels, fill=torch.zeros)

    def initial_values(self, g: torch.Generator):
        """Named channels' rows as an nn.Linear's: N(0, 0.02) truncated, zero bias."""
        from dchag.model.init import trunc_normal

        if self.name_weight is not None:
            yield "name_weight", trunc_normal(self.name_weight.shape, g)
            yield "name_bias", torch.zeros(self.name_bias.shape)

    def channel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Output weight [C, p*p, d] and bias [C, p*p] of every output channel."""
        features, spectral, name_row = self.table.select(None)
        weight = bias = None
        if self.table.any_spectral:
            generated = self.generate(features)  # [C, p*p*(d+1)]
            weight = generated[:, : self.pixels * self.dec_dim].view(-1, self.pixels, self.dec_dim)
            bias = generated[:, self.pixels * self.dec_dim :]
        weight = mix_rows(spectral, weight, self.name_weight, name_row)
        return weight, mix_rows(spectral, bias, self.name_bias, name_row)

    def subset(self, positions: list[int]) -> "ConditionedPixelOutput":
        """The same output for the channels at `positions` only (the by-name tables kept whole)."""
        local = copy.deepcopy(self)
        local.table = self.table.subset(positions, own_names=False)[0]
        return local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, d] -> [B, L, C*p*p], channel-major as nn.Linear(d, C*p*p) gives it."""
        weight, bias = self.channel_weights()  # [C, k, d], [C, k]
        return F.linear(x, rearrange(weight, "c k d -> (c k) d"), rearrange(bias, "c k -> (c k)"))
