"""What a channel is, for tokenizers that do not look weights up by name: its centre wavelength (and
bandwidth, when known) in nanometres, or - for weather variables, SAR and anything else without one -
its name.

Spectral channels are named by wavelength throughout dchag (`b664.6`, see `dchag.data.channels`), so a
channel list names its specs; `model.channel_specs` in a config overrides them one for one (e.g. to add
bandwidths). No default is silent: a spec list must have one entry per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dchag.config import BAND_RE, ConfigError


@dataclass(frozen=True)
class ChannelSpec:
    """One channel: `wavelength_nm` (and optionally `bandwidth_nm`) for a spectral band, else only `name`."""

    name: str
    wavelength_nm: float | None = None
    bandwidth_nm: float | None = None

    @property
    def spectral(self) -> bool:
        return self.wavelength_nm is not None


def spec_from_name(name: str) -> ChannelSpec:
    """`b664.6` -> a band at 664.6 nm; any other name -> a named channel."""
    match = BAND_RE.match(name)
    return ChannelSpec(name, float(match.group(1))) if match else ChannelSpec(name)


def parse_channel_spec(item, name: str, where: str) -> ChannelSpec:
    """One entry of `model.channel_specs` for the channel called `name`: a number (wavelength in nm), a
    mapping {wavelength: nm, bandwidth: nm} or {name: str}, or a string (a named channel)."""
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        item = {"wavelength": item}
    if isinstance(item, str):
        return ChannelSpec(item)
    if not isinstance(item, dict) or not item or set(item) - {"wavelength", "bandwidth", "name"}:
        raise ConfigError(
            f"{where}={item!r} must be a wavelength in nm, {{wavelength: NM, bandwidth: NM}} or {{name: NAME}}"
        )
    if "wavelength" not in item:
        if set(item) != {"name"} or not isinstance(item["name"], str) or not item["name"]:
            raise ConfigError(f"{where}={item!r}: a channel without a wavelength is given as {{name: NAME}}")
        return ChannelSpec(item["name"])
    values = {}
    for key in ("wavelength", "bandwidth"):
        if key in item:
            value = item[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if not ok:
                raise ConfigError(f"{where}.{key}={value!r} must be a positive number of nanometres")
            values[key] = float(value)
    return ChannelSpec(item.get("name", name), values["wavelength"], values.get("bandwidth"))


def resolve_channel_specs(channels: list[str], overrides: list | None = None, where="model.channel_specs"):
    """The spec of every channel, in order: from the names, or one override per channel."""
    if overrides is None:
        return [spec_from_name(c) for c in channels]
    if len(overrides) != len(channels):
        raise ConfigError(
            f"{where} has {len(overrides)} entries but the data has {len(channels)} channels; give one per channel"
        )
    return [parse_channel_spec(item, c, f"{where}[{i}]") for i, (item, c) in enumerate(zip(overrides, channels))]


def vocabulary_specs(vocabulary: list[str], channels: list[str], overrides: list | None = None) -> list[ChannelSpec]:
    """The spec of every vocabulary name: a channel's own (its `model.channel_specs` entry when given),
    else read from the name. Named specs must name one row each: two channels may not share a name."""
    own = dict(zip(channels, resolve_channel_specs(channels, overrides)))
    specs = [own.get(name) or spec_from_name(name) for name in vocabulary]
    named = [s.name for s in specs if not s.spectral]
    dupes = sorted({n for n in named if named.count(n) > 1})
    if dupes:
        raise ConfigError(f"model.channel_specs names {dupes} for more than one channel; give each its own name")
    return specs


def named_rows(specs: list[ChannelSpec]) -> list[str]:
    """The names of the channels without a wavelength, in order: the rows of a tokenizer's learned table."""
    return [s.name for s in specs if not s.spectral]
