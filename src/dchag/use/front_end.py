"""`dchag.FrontEnd`: D-CHAG's channel front end as a module in front of any ViT backbone.

An image [B, C, H, W] becomes one token per patch, [B, L, D], through per-channel tokenization and the
channel hierarchy, exactly as inside dchag's own model; the position embedding and any class token stay
the backbone's. It is the single-device module: `dchag.parallelize_front_end` spreads its channels over
a tensor-parallel group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dchag.config import HIERARCHY_PRESETS, TOKENIZERS, ConfigError, HierarchyConfig, LevelConfig
from dchag.model.channel_spec import ChannelSpec, parse_channel_spec, spec_from_name
from dchag.model.front_end import FrontEnd as ModelFrontEnd
from dchag.model.front_end import check_channel_keep
from dchag.model.groups import resolve_level_groups
from dchag.model.init import init_weights_
from dchag.model.spectral_tokenizer import build_tokenizer

DEFAULT_GROUPS = 4  # level-1 groups of a preset hierarchy (HierarchyConfig's default), at most one per channel


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ConfigError(f"FrontEnd({name}={value!r}) must be a positive int or a pair of them [H, W]")
    return pair


def channel_specs(channels: Sequence) -> list[ChannelSpec]:
    """One spec per channel from names (`b664.6` is a band at 664.6 nm), wavelengths in nm, mappings
    ({wavelength, bandwidth} or {name}) or ChannelSpec objects; names must be distinct."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
        raise ConfigError(f"FrontEnd(channels={channels!r}) must be a non-empty list, one entry per input channel")
    specs = []
    for i, item in enumerate(channels):
        if isinstance(item, ChannelSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(spec_from_name(item))
        else:  # a wavelength in nm or a mapping; a band is named by its wavelength, as dchag's data name it
            nm = item.get("wavelength") if isinstance(item, dict) else item
            name = f"b{float(nm)}" if isinstance(nm, (int, float)) and not isinstance(nm, bool) else f"channel{i}"
            specs.append(parse_channel_spec(item, name, f"FrontEnd(channels[{i}])"))
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise ConfigError(
                f"FrontEnd(channels[{i}]={spec.name!r}) repeats channels[{seen[spec.name]}]; every channel needs "
                "its own name (its weights are looked up by it)"
            )
        seen[spec.name] = i
    return specs


def _levels(hierarchy, groups: int | None, channels: int) -> tuple[list[LevelConfig], int | None, bool]:
    """(levels, heads or None, qk_norm) from a preset name, a HierarchyConfig or a list of LevelConfig."""
    if isinstance(hierarchy, str):
        if hierarchy not in HIERARCHY_PRESETS:
            raise ConfigError(
                f"FrontEnd(hierarchy={hierarchy!r}) is unknown; use one of {HIERARCHY_PRESETS}, a HierarchyConfig "
                "or a list of LevelConfig"
            )
        g = groups if groups is not None else min(DEFAULT_GROUPS, channels)
        return HierarchyConfig(preset=hierarchy, groups=g).resolved_levels(), None, False
    if groups is not None:
        raise ConfigError(f"FrontEnd(groups={groups}) applies to a preset name only; set the groups in the hierarchy")
    if isinstance(hierarchy, HierarchyConfig):
        return hierarchy.resolved_levels(), hierarchy.heads, hierarchy.qk_norm
    if isinstance(hierarchy, (list, tuple)) and hierarchy and all(isinstance(v, LevelConfig) for v in hierarchy):
        return list(hierarchy), None, False
    raise ConfigError(
        f"FrontEnd(hierarchy={hierarchy!r}) must be a preset name {HIERARCHY_PRESETS}, a HierarchyConfig or a "
        "list of LevelConfig"
    )


def default_heads(embed_dim: int) -> int:
    """The aggregators' attention heads when not given: the largest of 8, 4, 2, 1 that divides the width
    (a power of two, so the last level's heads split over 2, 4 or 8 TP ranks)."""
    return next(h for h in (8, 4, 2, 1) if embed_dim % h == 0)


class FrontEnd(ModelFrontEnd):
    """Image [B, C, H, W] -> patch tokens [B, L, D], L = (H/p)(W/p) in row-major order.

    `channels`: one entry per input channel, in input order: names (`b664.6` for a band at 664.6 nm),
    wavelengths in nm, or ChannelSpec. `img_size` (H, W), `patch_size` and `embed_dim` must match the
    backbone's patch grid and width. `hierarchy`: a preset (`dchag-L` by default: `groups` linear
    poolings, then one cross-attention), a HierarchyConfig or a list of LevelConfig. `fused`: aggregate
    without materializing per-channel tokens where exact. `tokenizer`: `per_channel` (own weights per
    channel name), `wavelength` (one shared projection plus an embedding computed from each band's
    wavelength) or `hypernetwork` (patch weights generated from the wavelength); channels without a
    wavelength keep learned rows by name. `seed`: the initial weights (the same seed gives the same
    weights on every rank, whatever the global RNG state).
    """

    def __init__(
        self,
        channels: Sequence,
        *,
        img_size: int | Sequence[int],
        patch_size: int,
        embed_dim: int,
        hierarchy: str | HierarchyConfig | list[LevelConfig] = "dchag-L",
        groups: int | None = None,
        heads: int | None = None,
        qk_norm: bool = False,
        fused: bool = True,
        tokenizer: str = "per_channel",
        seed: int = 0,
    ):
        specs = channel_specs(channels)
        height, width = _pair(img_size, "img_size")
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ConfigError(f"FrontEnd(patch_size={patch_size!r}) must be a positive int")
        if height % patch_size or width % patch_size:
            raise ConfigError(
                f"FrontEnd(img_size=[{height}, {width}]) is not divisible by patch_size={patch_size}; "
                "use a size that is a multiple of the patch"
            )
        if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
            raise ConfigError(f"FrontEnd(embed_dim={embed_dim!r}) must be a positive int")
        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"FrontEnd(tokenizer={tokenizer!r}) is unknown; use one of {TOKENIZERS}")
        levels, config_heads, config_qk_norm = _levels(hierarchy, groups, len(specs))
        heads = heads or config_heads or default_heads(embed_dim)
        if embed_dim % heads:
            raise ConfigError(f"FrontEnd(heads={heads}) does not divide embed_dim={embed_dim}")
        resolve_level_groups(levels, len(specs), where="FrontEnd(hierarchy).levels")
        tok = None if tokenizer == "per_channel" else build_tokenizer(tokenizer, specs, embed_dim, patch_size)
        channels = len(specs)
        qk_norm = qk_norm or config_qk_norm
        super().__init__(list(range(channels)), channels, embed_dim, patch_size, levels, heads, qk_norm, fused, tok)
        init_weights_(self, seed)
        self.channel_specs = specs
        self.img_size = (height, width)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.tokenizer_kind = tokenizer

    @property
    def channels(self) -> list[str]:
        """The input channels' names, in input order."""
        return [spec.name for spec in self.channel_specs]

    @property
    def num_channels(self) -> int:
        return len(self.channel_specs)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(H/p, W/p): patches per column and per row."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        """A one-line error naming the shape unless x is [B, C, H, W] with this front end's C, H, W."""
        want = self.num_channels
        if x.ndim != 4 or x.shape[1] != want or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"the front end got x of shape {list(x.shape)}; it takes [B, {want}, {self.img_size[0]}, "
                f"{self.img_size[1]}] ({want} channels of {self.img_size[0]} x {self.img_size[1]} pixels)"
            )

    def forward(self, x: torch.Tensor, channel_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] -> [B, L, D]. `channel_keep` [C] (bool, at least one True): a band subset; the
        channels marked False are left out as if absent (their pixels influence nothing)."""
        self.check_input(x)
        if channel_keep is not None:
            check_channel_keep(channel_keep, self.num_channels, values=True)
        return super().forward(x, channel_keep)
