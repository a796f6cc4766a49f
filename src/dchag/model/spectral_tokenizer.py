"""Sensor-agnostic tokenizers: a channel's patch embedding computed from its wavelength, so a model reads
bands it never saw (another sensor, a subset, hundreds of bands) with the same parameters.

Both give what the front end consumes from any tokenizer: `channel_params(index)` -> weight [C, D, p, p]
and shift [C, D] (bias + channel embedding) of the vocabulary rows `index`, and `forward(x, index)` ->
tokens [B, C, L, D]; so the fused front end and channel parallelism work unchanged.

- `WavelengthTokenizer` (Panopticon style): one patch projection weight [D, p, p] and bias [D] shared by
  every channel (expanded to [C, D, p, p], never copied); the channel embedding is a learned map of the
  fixed Fourier encoding of the wavelength (and bandwidth). No parameter's shape depends on C.
- `HypernetworkTokenizer` (DOFA style): the patch weights [C, D, p, p] themselves are generated from the
  encoding by a small network (its output bias is the shared weight the channels vary around).

Channels without a wavelength (weather variables, SAR) keep learned rows by name instead: the channel
embedding (`channel_embed [V_named, D]`) and, for the hypernetwork, the patch weight (`name_weight`).
The rows cover the named channels of the vocabulary, in order; without such channels there are no tables.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dchag.model.channel_encoding import (
    FEATURES,
    HYPER_HIDDEN,
    ChannelEncoder,
    ChannelTable,
    by_name_table,
    mix_rows,
)
from dchag.model.channel_spec import ChannelSpec, named_rows
from dchag.model.tokenizer import ChannelTokenizer, tokens_from_params

EMBED_STD = 0.5  # the channel embedding's initial spread: a per-channel tokenizer starts its at sin-cos values


class WavelengthTokenizer(nn.Module):
    """Shared patch projection + a channel embedding from the channel's spec (see the module text)."""

    def __init__(self, specs: list[ChannelSpec], dim: int, patch: int):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.table = ChannelTable(specs, named_rows(specs))
        self.weight = nn.Parameter(torch.empty(dim, patch, patch))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.embed = ChannelEncoder(FEATURES, dim, dim, out_std=EMBED_STD)
        self.channel_embed = by_name_table(len(self.table.names), dim)

    @property
    def vocab_size(self) -> int:
        return len(self.table.specs)

    def initial_values(self, g: torch.Generator):
        """Weight N(0, 0.02) truncated, zero bias, named channels' embeddings N(0, EMBED_STD) truncated."""
        from dchag.model.init import trunc_normal

        yield "weight", trunc_normal(self.weight.shape, g)
        yield "bias", torch.zeros(self.bias.shape)
        if self.channel_embed is not None:
            yield "channel_embed", trunc_normal(self.channel_embed.shape, g, std=EMBED_STD)

    def channel_shift(self, index: torch.Tensor | None) -> torch.Tensor:
        """bias + channel embedding [C, D] of rows `index`."""
        features, spectral, name_row = self.table.select(index)
        computed = self.embed(features) if self.table.any_spectral else None  # [C, D]
        return self.bias + mix_rows(spectral, computed, self.channel_embed, name_row)

    def channel_weight(self, index: torch.Tensor | None) -> torch.Tensor:
        """The shared weight as [C, D, p, p], a view."""
        count = self.vocab_size if index is None else len(index)
        return self.weight.expand(count, *self.weight.shape)

    def channel_params(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [C, D, p, p] and shift [C, D] of the vocabulary rows `index` (None: every row)."""
        return self.channel_weight(index), self.channel_shift(index)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """x [B, C, H, W], index [C] (or None for all rows) -> tokens [B, C, L, D]."""
        return tokens_from_params(x, *self.channel_params(index), self.patch)

    # ---- channel parallelism: a rank's rows -------------------------------------------------------
    def row_params(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """{parameter: its rows for vocabulary rows `rows`} of the parameters indexed by channel (the
        by-name tables); every other parameter is shared by all channels."""
        _, positions = self.table.subset(rows)
        return {name: torch.tensor(positions, dtype=torch.long) for name in self.by_name}

    by_name = ("channel_embed",)

    def rows(self, rows: list[int]) -> "WavelengthTokenizer":
        """A tokenizer for vocabulary rows `rows` only: the shared parameters and those rows' by-name rows
        (copies; on the meta device, shapes only)."""
        table, positions = self.table.subset(rows)
        local = copy.deepcopy(self)  # shared parameters whole
        local.table = table
        for name in self.by_name:
            param = getattr(self, name)
            if param is None or not positions:  # no named channel among these rows: no table
                setattr(local, name, None)
                continue
            index = torch.tensor(positions, dtype=torch.long, device=param.device)
            setattr(local, name, nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad))
        return local


class HypernetworkTokenizer(WavelengthTokenizer):
    """Patch weights generated per channel from its encoding; a shift as `WavelengthTokenizer`'s."""

    def __init__(self, specs: list[ChannelSpec], dim: int, patch: int):
        super().__init__(specs, dim, patch)
        del self.weight  # the generator's output bias is the shared weight
        self.generate = ChannelEncoder(FEATURES, HYPER_HIDDEN, dim * patch * patch, out_std=0.01, base_std=0.02)
        self.name_weight = by_name_table(len(self.table.names), dim, patch, patch)

    by_name = ("channel_embed", "name_weight")

    def initial_values(self, g: torch.Generator):
        """Zero bias; named channels' embeddings N(0, EMBED_STD) and patch weights N(0, 0.02), truncated."""
        from dchag.model.init import trunc_normal

        yield "bias", torch.zeros(self.bias.shape)
        if self.table.names:
            yield "channel_embed", trunc_normal(self.channel_embed.shape, g, std=EMBED_STD)
            yield "name_weight", trunc_normal(self.name_weight.shape, g)

    def channel_weight(self, index: torch.Tensor | None) -> torch.Tensor:
        """Generated (spectral) or learned (named) weights [C, D, p, p]."""
        features, spectral, name_row = self.table.select(index)
        computed = None
        if self.table.any_spectral:
            computed = self.generate(features).view(-1, self.dim, self.patch, self.patch)
        return mix_rows(spectral, computed, self.name_weight, name_row)



def build_tokenizer(kind: str, specs: list[ChannelSpec], dim: int, patch: int) -> nn.Module:
    """The tokenizer `model.tokenizer` names, over a vocabulary whose channels `specs` describe."""
    if kind == "per_channel":
        return ChannelTokenizer(len(specs), dim, patch)
    if kind == "wavelength":
        return WavelengthTokenizer(specs, dim, patch)
    if kind == "hypernetwork":
        return HypernetworkTokenizer(specs, dim, patch)
    raise ValueError(f"model.tokenizer={kind!r} is unknown; use per_channel, wavelength or hypernetwork")
