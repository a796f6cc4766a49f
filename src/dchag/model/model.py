"""The whole model: front end -> position / lead-time embedding -> ViT -> task head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from einops import repeat
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
        visible_norm: bool = False,
    ):
        super().__init__()
        # MAE: each sample's bands standardised by its visible pixels, the reconstruction scaled back
        self.visible_norm = visible_norm
        # the visible-pixel sums of a context-parallel rank's strip are added over the strips (set from outside)
        self.sum_over_strips: Callable[[torch.Tensor], torch.Tensor] | None = None
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

    def standardised(
        self, x: torch.Tensor, mask: torch.Tensor | None, channel_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, "Moments | None"]:
        """An MAE's input x [B, C, H, W] as its encoder reads it, and the moments to scale the output back
        with: with `model.visible_norm`, each sample's bands standardised by the pixels of the patches
        that `mask` [B, L] (1 = masked; None: every patch, as for embeddings) leaves visible; otherwise
        (and for forecast models) x as given."""
        if not self.visible_norm:
            return x, None
        if mask is None:
            mask = x.new_zeros(x.shape[0], self.grid[0] * self.grid[1])
        keep = None if channel_keep is None else self.front_end.input_keep(channel_keep)
        moments = visible_moments(x, mask, self.head.patch, keep, self.sum_over_strips)
        return ((x - moments.shift) / moments.scale).to(x.dtype), moments  # [B, C, H, W]: the sample's units

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
        if self.task == "forecast":
            z = self.patch_tokens(x, lead_hours, channel_keep)  # [B, L, D]
            pred = self.head(self.encode(z))  # [B, C_out, H, W]
            if self.residual:
                base = x.index_select(1, self.residual_from)
                if channel_keep is not None:  # a left-out input adds no residual: the head forecasts it alone
                    kept = self.front_end.input_keep(channel_keep).index_select(0, self.residual_from)
                    base = torch.where(kept[None, :, None, None], base, 0.0)
                pred = pred + base.to(pred.dtype)
            return ModelOutput(pred)
        if mask_noise is None:
            mask_noise = torch.rand(x.shape[0], self.num_patches, device=x.device)
        layout = self.masking(mask_noise, self.mask_ratio if mask_ratio is None else mask_ratio)
        x, moments = self.standardised(x, layout.mask, channel_keep)
        z = self.patch_tokens(x, lead_hours, channel_keep)  # [B, L, D]
        visible = torch.gather(z, 1, layout.visible[..., None].expand(-1, -1, z.shape[-1]))  # [B, n, D]
        patches = self.head(self.encode(visible), layout.slots, self.token_slice)  # [B, L, C*p*p]
        if moments is not None:  # back to the data's units: per sample and band, every pixel of a patch alike
            pixels = self.head.patch**2
            scale = repeat(moments.scale, "b c 1 1 -> b 1 (c p)", p=pixels).to(patches.dtype)
            shift = repeat(moments.shift, "b c 1 1 -> b 1 (c p)", p=pixels).to(patches.dtype)
            patches = patches * scale + shift
        return ModelOutput(mask=layout.mask, patches=patches, to_image=self.head.image)


@dataclass
class Moments:
    """Per sample and band, shift [B, C, 1, 1] and scale [B, C, 1, 1] of `model.visible_norm`."""

    shift: torch.Tensor
    scale: torch.Tensor


# variance floor of model.visible_norm, in the data's normalised units: a band that is flat over a
# sample's visible pixels is scaled by at most 1/0.01, not by the inverse of its noise
VISIBLE_VAR_FLOOR = 1e-4


def visible_moments(
    x: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    keep: torch.Tensor | None = None,
    sum_over_strips: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Moments:
    """Mean and standard deviation of x [B, C, H, W] over the visible pixels (mask [B, L], 1 = masked) of
    each sample and band: the reversible instance normalisation (RevIN) of `model.visible_norm`. The model
    reads (x - shift) / scale and reconstructs in those units; scaled back, a zero output is the
    mean-spectrum baseline, and a sensor's or scene's offset and gain per band are not the model's to learn.
    Bands left out (`keep` [C] False) keep the data's normalisation (shift 0, scale 1): the model must not
    read their visible pixels. Computed from the data alone (no gradient), in float64 sums, which a
    context-parallel rank adds over the strips with `sum_over_strips`."""
    grid_w = x.shape[-1] // patch
    with torch.no_grad():
        seen = repeat(1 - mask.double(), "b (h w) -> b 1 (h p1) (w p2)", w=grid_w, p1=patch, p2=patch)
        values = x.double()
        sums = torch.stack(
            [
                seen.sum((2, 3)).expand(-1, x.shape[1]),  # [B, C]: visible pixels
                (values * seen).sum((2, 3)),  # [B, C]
                (values.square() * seen).sum((2, 3)),  # [B, C]
            ]
        )  # [3, B, C]
        if sum_over_strips is not None:
            sums = sum_over_strips(sums)
        count = sums[0].clamp(min=1)
        mean = sums[1] / count
        var = (sums[2] / count - mean.square()).clamp(min=0) + VISIBLE_VAR_FLOOR
        shift, scale = mean, var.sqrt()  # [B, C]
        if keep is not None:
            shift = torch.where(keep[None], shift, 0.0)
            scale = torch.where(keep[None], scale, 1.0)
        return Moments(shift[..., None, None].to(torch.float32), scale[..., None, None].to(torch.float32))


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
        visible_norm=m.visible_norm,
    )
    return init_weights_(model, cfg.train.seed) if init else model
