"""The whole model: front end -> position / lead-time embedding -> ViT -> task head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from dchag.model.channel_spec import named_rows, vocabulary_specs
from dchag.model.embeddings import sincos_2d
from dchag.model.front_end import FrontEnd
from dchag.model.heads import ConditionedPixelOutput, ForecastHead, MAEDecoder, mask_layout
from dchag.model.init import init_weights_
from dchag.model.spectral_tokenizer import build_tokenizer
from dchag.model.vit import Block, StripDropout


@dataclass
class ModelOutput:
    """A forecast's prediction, or an MAE's reconstruction per patch and its mask. The MAE's image `pred`
    is made from `patches` on first read: training's loss reads the patches, so neither an image-layout
    copy of the reconstruction nor its gradient ever exists there."""

    _pred: torch.Tensor | None = None  # forecast [B, C_out, H, W]
    mask: torch.Tensor | None = None  # MAE: [B, L], 1 = masked patch
    patches: torch.Tensor | None = None  # MAE: [B, L, C*p*p]
    to_image: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def pred(self) -> torch.Tensor:
        """forecast [B, C_out, H, W] or reconstruction [B, C, H, W]"""
        if self._pred is None:
            self._pred = self.to_image(self.patches)
        return self._pred


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
        tokenizer: str = "per_channel",
        vocab_specs: list | None = None,
    ):
        super().__init__()
        # forecast the change: pred = head + the input field of each output channel (its input index)
        self.register_buffer("residual_from", torch.tensor(residual_from or [], dtype=torch.long), persistent=False)
        self.residual = residual_from is not None
        self.task, self.mask_ratio = task, mask_ratio
        grid = (img_size[0] // patch, img_size[1] // patch)
        self.grid = grid
        self.num_patches = grid[0] * grid[1]
        # the patch tokens this model computes, in row-major order: all of them on one device; a strip of
        # whole patch rows on a context-parallel rank (set by dchag.parallel.context_parallel)
        self.token_slice = slice(None)
        # an MAE's mask of those tokens from the noise [B, L] (`MaskLayout`); a context-parallel rank's
        # part of it is set from outside too
        self.masking = mask_layout
        # model.tokenizer: per-channel weights by name, or computed from the vocabulary's channel specs
        tok = None if tokenizer == "per_channel" else build_tokenizer(tokenizer, vocab_specs, dim, patch)
        self.front_end = FrontEnd(
            channel_index, vocab_size, dim, patch, levels, agg_heads, qk_norm, fused_front_end, tokenizer=tok
        )
        self.pos_embed = nn.Parameter(sincos_2d(dim, *grid)[None])  # [1, L, D], learnable
        self.lead_embed = nn.Linear(1, dim) if task == "forecast" else None
        self.drop = StripDropout(drop_rate)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        if task == "forecast":
            self.head = ForecastHead(dim, out_channels, patch, grid[1])
        else:
            # a sensor-agnostic model also reconstructs from wavelengths: any channels, not only trained ones
            pred = None
            if tokenizer != "per_channel":
                specs = [vocab_specs[i] for i in channel_index]
                pred = ConditionedPixelOutput(specs, named_rows(vocab_specs), decoder_dim, patch)
            self.head = MAEDecoder(
                dim, decoder_dim, decoder_depth, decoder_heads, len(channel_index), patch, grid, pred=pred
            )

    def initial_values(self, g: torch.Generator):
        """The learnable position embedding starts as the 2-D sin-cos table."""
        yield "pos_embed", sincos_2d(self.pos_embed.shape[-1], *self.grid)[None]

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.drop(z)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)

    def patch_tokens(
        self, x: torch.Tensor, lead_hours: torch.Tensor | None = None, channel_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tokens [B, L, D] the ViT blocks take, before any masking: front end + position embedding,
        plus the lead-time embedding of a forecast model (which needs lead_hours [B])."""
        z = self.front_end(x, channel_keep) + self.pos_embed[:, self.token_slice]  # [B, L, D]
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
        channel_keep: torch.Tensor | None = None,
    ) -> ModelOutput:
        """x [B, C, H, W]; forecast needs lead_hours [B]; mae takes mask_noise [B, L] (uniform; drawn if None)
        and masks `mask_ratio` of the patches (default: the trained train.mask_ratio).
        `channel_keep` [C] (bool): a band subset; the channels marked False are left out as if absent, and
        the model still predicts every channel (an MAE reconstructs the missing bands too)."""
        z = self.patch_tokens(x, lead_hours, channel_keep)  # [B, L, D]
        if self.task == "forecast":
            pred = self.head(self.encode(z))  # [B, C_out, H, W]
            if self.residual:
                base = x.index_select(1, self.residual_from)
                if channel_keep is not None:  # a left-out input adds no residual: the head forecasts it alone
                    kept = self.front_end.input_keep(channel_keep).index_select(0, self.residual_from)
                    base = torch.where(kept[None, :, None, None], base, 0.0)
                pred = pred + base.to(pred.dtype)
            return ModelOutput(pred)
        if mask_noise is None:
            mask_noise = torch.rand(z.shape[0], self.num_patches, device=z.device)
        layout = self.masking(mask_noise, self.mask_ratio if mask_ratio is None else mask_ratio)
        visible = torch.gather(z, 1, layout.visible[..., None].expand(-1, -1, z.shape[-1]))  # [B, n, D]
        patches = self.head(self.encode(visible), layout.slots, self.token_slice)  # [B, L, C*p*p]
        return ModelOutput(mask=layout.mask, patches=patches, to_image=self.head.image)


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
        tokenizer=m.tokenizer,
        vocab_specs=vocabulary_specs(vocab, cfg.channels, m.channel_specs),
    )
    return init_weights_(model, cfg.train.seed) if init else model
