"""What the sensor-agnostic tokenizers and the wavelength-conditioned MAE output know of a channel: a
fixed Fourier encoding of its spectral response, and a small learned map from it.

The encoding of a band at centre wavelength w with bandwidth b is the mean of a sin-cos encoding of the
wavelength (`FEATURES / 2` frequencies f, periods geometric from 40 nm to 40 um) over a box response
[w - b/2, w + b/2]: sin(f w) sinc(f b/2) and cos(f w) sinc(f b/2). A band of unknown width is a line
(b = 0). Wide bands lose the fine-wavelength features, as they should: they cannot tell wavelengths apart
within their width. The shortest period sets how fast codes change with wavelength: bands 5 nm apart
(Landsat-8's and Sentinel-2's near twins) get nearly the same code, bands 100 nm apart clearly different
ones, and visible, infrared and thermal bands (to 12 um) all get distinct codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dchag.model.channel_spec import ChannelSpec

FEATURES = 128  # width of the fixed encoding
SHORTEST_NM, LONGEST_NM = 40.0, 40000.0  # its periods
HYPER_HIDDEN = 128  # hidden width of the networks that generate per-channel weights


def spectral_features(specs: list[ChannelSpec], width: int = FEATURES) -> torch.Tensor:
    """[C, width] encodings (float32, computed in float64); zeros for channels without a wavelength."""
    half = width // 2
    periods = SHORTEST_NM * (LONGEST_NM / SHORTEST_NM) ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    freq = 2 * math.pi / periods  # [half], radians per nm
    out = torch.zeros(len(specs), width, dtype=torch.float64)
    for i, spec in enumerate(specs):
        if not spec.spectral:
            continue
        damp = torch.special.sinc(freq * (spec.bandwidth_nm or 0.0) / (2 * math.pi))  # sin(f b/2) / (f b/2)
        out[i, :half] = torch.sin(freq * spec.wavelength_nm) * damp
        out[i, half : 2 * half] = torch.cos(freq * spec.wavelength_nm) * damp
    return out.float()


class ChannelTable(nn.Module):
    """Buffers (not saved: computed from the channel specs) describing channels row by row: their
    encodings `features [C, F]`, whether they are `spectral [C]`, and `name_row [C]`, the row of a named
    channel in the learned by-name tables (-1 for spectral channels)."""

    def __init__(self, specs: list[ChannelSpec], names: list[str]):
        super().__init__()
        self.specs = list(specs)
        self.names = list(names)  # the rows of the by-name tables
        row = {n: i for i, n in enumerate(self.names)}
        self.register_buffer("features", spectral_features(self.specs), persistent=False)
        self.register_buffer("spectral", torch.tensor([s.spectral for s in self.specs], dtype=torch.bool), False)
        name_row = [-1 if s.spectral else row[s.name] for s in self.specs]
        self.register_buffer("name_row", torch.tensor(name_row, dtype=torch.long), persistent=False)
        self.any_spectral = any(s.spectral for s in self.specs)

    def select(self, index: torch.Tensor | None):
        """(features [C, F], spectral [C], name_row [C]) of rows `index` (None: all)."""
        if index is None:
            return self.features, self.spectral, self.name_row
        return self.features[index], self.spectral[index], self.name_row[index]

    def subset(self, rows: list[int], own_names: bool = True) -> tuple["ChannelTable", list[int]]:
        """The table of rows `rows`, and the positions in this table's by-name rows of those it keeps.
        `own_names`: the new table's by-name rows are only those of the named channels kept (a rank's
        slice of the tables); else it keeps pointing into this table's whole by-name tables."""
        specs = [self.specs[int(r)] for r in rows]
        names = [s.name for s in specs if not s.spectral]
        table = ChannelTable(specs, names if own_names else self.names).to(self.features.device, self.features.dtype)
        return table, [self.names.index(n) for n in names]


def by_name_table(rows: int, *shape: int, fill=torch.empty) -> nn.Parameter | None:
    """A learned table [rows, *shape] of by-name rows, or None when there are no rows: a tensor without
    elements would be left out of checkpoints, and its absence says the same."""
    return nn.Parameter(fill(rows, *shape)) if rows else None


def mix_rows(spectral: torch.Tensor, computed: torch.Tensor | None, table, name_row: torch.Tensor):
    """Per channel, the row computed from its wavelength (spectral) or its row of the by-name `table`:
    [C, ...]; `computed` is None when no channel is spectral, `table` when none is named."""
    if table is None:
        return computed
    named = table[name_row.clamp(min=0)]  # [C, ...]
    if computed is None:
        return named
    return torch.where(spectral.view(-1, *([1] * (named.ndim - 1))), computed, named)


class ChannelEncoder(nn.Module):
    """The learned map from the fixed encoding: Linear - GELU - Linear, [C, F] -> [C, out]. Shapes depend
    on the widths only, never on the number of channels.

    Initialised so that its outputs have a standard deviation of about `out_std` whatever the widths
    (the encodings have unit mean square per pair of features); `base_std` > 0 starts the output bias at
    N(0, base_std), a shared value every channel's output varies around (a generated weight's mean).
    """

    def __init__(self, features: int, hidden: int, out: int, out_std: float, base_std: float = 0.0):
        super().__init__()
        self.out_std, self.base_std = out_std, base_std
        self.in_weight = nn.Parameter(torch.empty(hidden, features))
        self.in_bias = nn.Parameter(torch.zeros(hidden))
        self.out_weight = nn.Parameter(torch.empty(out, hidden))
        self.out_bias = nn.Parameter(torch.zeros(out))

    def initial_values(self, g: torch.Generator):
        from dchag.model.init import trunc_normal

        hidden, features = self.in_weight.shape
        # the encodings' squared norm is F/2: std sqrt(2/F) gives unit-variance pre-activations; GELU of those
        # has a root mean square near 0.6, so the second matrix takes out_std / (0.6 sqrt(H))
        yield "in_weight", trunc_normal(self.in_weight.shape, g, std=math.sqrt(2.0 / features))
        yield "in_bias", torch.zeros(self.in_bias.shape)
        yield "out_weight", trunc_normal(self.out_weight.shape, g, std=self.out_std / (0.6 * math.sqrt(hidden)))
        base = trunc_normal(self.out_bias.shape, g, std=self.base_std) if self.base_std > 0 else None
        yield "out_bias", base if base is not None else torch.zeros(self.out_bias.shape)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [C, F] -> [C, out], in the weights' dtype: the encodings are a float32 buffer, which
        FSDP2's bf16 parameters (parallel.bf16_params) do not cast."""
        features = features.to(self.in_weight.dtype)
        return F.linear(F.gelu(F.linear(features, self.in_weight, self.in_bias)), self.out_weight, self.out_bias)
