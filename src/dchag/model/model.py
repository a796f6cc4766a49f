"""The whole model: front end -> position / lead-time embedding -> ViT -> task head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dchag.model.embeddings import sincos_2d
from dchag.model.front_end import FrontEnd
from dchag.model.heads import ForecastHead, MAEDecoder, random_masking
from dchag.model.init import init_weights_
from dchag.model.vit import Block


@dataclass
class ModelOutput:
    pred: torch.Tensor  # forecast [B, C_out, H, W] or reconstruction [B, C, H, W]
    mask: torch.Tensor | None = None  # MAE: [B, L], 1 = masked patch


class ChannelViT(nn.Module):
    """A many-channel ViT for forecasting (`task="forecast"`) or masked-autoencoder pretraining ("mae")."""

    def __init__(
        self,
        *,
        task: str,
        channel_index: list[int],
        vocab_size: int,
        img_size: tuple[int, int],
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        drop_rate: float,
        levels,
        agg_heads: int,
        qk_norm: bool,
        out_channels: int,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        mask_ratio: float,
        fused_front_end: bool = True,
        residual_from: list[int] | None = None,
    ):
        super().__init__()
        # forecast the change: pred = head + the input field of each output channel (its input index)
        self.register_buffer("residual_from", torch.tensor(residual_from or [], dtype=torch.long), persistent=False)
        self.residual = residual_from is not None
        self.task, self.mask_ratio = task, mask_ratio
        grid = (img_size[0] // patch, img_size[1] // patch)
        self.grid = grid
        self.num_patches = grid[0] * grid[1]
        self.front_end = FrontEnd(channel_index, vocab_size, dim, patch, levels, agg_heads, qk_norm, fused_front_end)
        self.pos_embed = nn.Parameter(sincos_2d(dim, *grid)[None])  # [1, L, D], learnable
        self.lead_embed = nn.Linear(1, dim) if task == "forecast" else None
        self.drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        if task == "forecast":
            self.head = ForecastHead(dim, out_channels, patch, grid[1])
        else:
            self.head = MAEDecoder(dim, decoder_dim, decoder_depth, decoder_heads, len(channel_index), patch, grid)

    def initial_values(self, g: torch.Generator):
        """The learnable position embedding starts as the 2-D sin-cos table."""
        yield "pos_embed", sincos_2d(self.pos_embed.shape[-1], *self.grid)[None]

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.drop(z)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)

    def patch_tokens(self, x: torch.Tensor, lead_hours: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens [B, L, D] the ViT blocks take, before any masking: front end + position embedding,
        plus the lead-time embedding of a forecast model (which needs lead_hours [B])."""
        z = self.front_end(x) + self.pos_embed  # [B, L, D]
        if self.task == "forecast":
            if lead_hours is None:
                raise ValueError("a forecast model needs lead_hours [B]")
            z = z + self.lead_embed(lead_hours.to(z.dtype)[:, None] / 100.0)[:, None, :]
        return z

    def forward(
        self,
        x: torch.Tensor,
        lead_hours: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
    ) -> ModelOutput:
        """x [B, C, H, W]; forecast needs lead_hours [B]; mae takes mask_noise [B, L] (uniform; drawn if None)
        and masks `mask_ratio` of the patches (default: the trained train.mask_ratio)."""
        z = self.patch_tokens(x, lead_hours)  # [B, L, D]
        if self.task == "forecast":
            pred = self.head(self.encode(z))  # [B, C_out, H, W]
            if self.residual:
                pred = pred + x.index_select(1, self.residual_from).to(pred.dtype)
            return ModelOutput(pred)
        if mask_noise is None:
            mask_noise = torch.rand(z.shape[0], z.shape[1], device=z.device)
        keep, restore, mask = random_masking(mask_noise, self.mask_ratio if mask_ratio is None else mask_ratio)
        visible = torch.gather(z, 1, keep[..., None].expand(-1, -1, z.shape[-1]))  # [B, L_keep, D]
        return ModelOutput(self.head(self.encode(visible), restore), mask)


def build_model(cfg, *, init: bool = True) -> ChannelViT:
    """The single-device model a resolved `Config` describes, with its initial weights from
    `train.seed` (`model.init`; `init=False` leaves them as constructed, e.g. on the meta device)."""
    m = cfg.model
    vocab = cfg.vocabulary
    position = {name: i for i, name in enumerate(vocab)}
    model = ChannelViT(
        task=cfg.train.task,
        channel_index=[position[c] for c in cfg.channels],
        vocab_size=len(vocab),
        img_size=tuple(m.img_size),
        patch=m.patch_size,
        dim=m.embed_dim,
        depth=m.depth,
        heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        drop_rate=m.drop_rate,
        levels=m.hierarchy.resolved_levels(),
        agg_heads=m.hierarchy.heads or m.num_heads,
        qk_norm=m.hierarchy.qk_norm,
        out_channels=len(cfg.out_channels) if cfg.train.task == "forecast" else 0,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        mask_ratio=cfg.train.mask_ratio,
        fused_front_end=m.fused_front_end,
        residual_from=[cfg.channels.index(c) for c in cfg.out_channels]
        if m.residual_forecast and cfg.train.task == "forecast"
        else None,
    )
    return init_weights_(model, cfg.train.seed) if init else model
