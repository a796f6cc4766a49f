"""A trained wavelength / hypernetwork model rebuilt for other channels (another sensor's bands, a subset,
hundreds of bands), with the same weights: `dchag.load(...).for_channels(...)` and
`dchag eval --data-config`.

Its tokenizer and MAE output compute each channel's weights from its wavelength, so no weight depends on
which channels there are, except for a hierarchy with linear levels (a weight as wide as the largest
group) and the rows of channels without a wavelength (matched here by name). A per-channel model has
weights per channel name only: it is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses

import torch

from dchag.config import ChannelLists, Config, ConfigError, validate
from dchag.configure import check_channels
from dchag.model import build_model
from dchag.model.channel_spec import named_rows, vocabulary_specs

# the by-name tables of wavelength models: one row per vocabulary channel without a wavelength
BY_NAME = (
    "front_end.tokenizer.channel_embed",
    "front_end.tokenizer.name_weight",
    "head.pred.name_weight",
    "head.pred.name_bias",
)


def config_for_channels(cfg: Config, channels: list[str], channel_specs: list | None = None, data=None) -> Config:
    """`cfg` for `channels` (their specs from the names, or `channel_specs`); `data`: a data section that
    serves them (default: the run's, with the channel list replaced). Checked as a config is."""
    if cfg.model.tokenizer == "per_channel":
        raise ConfigError(
            "this run has model.tokenizer=per_channel: its weights belong to the channels it trained on by name, "
            "so it cannot read other channels; train with model.tokenizer: wavelength (or hypernetwork)"
        )
    channels = list(channels)
    model = dataclasses.replace(cfg.model, vocabulary=None, channel_specs=channel_specs)
    data = data if data is not None else dataclasses.replace(cfg.data, channels=channels)
    out = cfg.out_channels if cfg.train.task == "forecast" else channels  # a forecast head is per target
    new = dataclasses.replace(cfg, model=model, data=data, resolved=ChannelLists(tuple(channels), tuple(out)))
    validate(new)  # the run's model with the other data section: every cross-section check, once
    check_channels(new)
    return new


def _named(cfg: Config) -> list[str]:
    return named_rows(vocabulary_specs(cfg.vocabulary, cfg.channels, cfg.model.channel_specs))


def model_for_channels(
    cfg: Config, model: torch.nn.Module, channels: list[str], channel_specs: list | None = None, data=None
) -> tuple[Config, torch.nn.Module]:
    """(config, single-device model) for `channels` with `model`'s weights (see `config_for_channels`)."""
    new_cfg = config_for_channels(cfg, channels, channel_specs, data)
    state = model.state_dict()
    before, after = _named(cfg), _named(new_cfg)
    unknown = [n for n in after if n not in before]
    if unknown:
        raise ConfigError(
            f"channels {unknown[:5]} have no wavelength and the run has no weights for them (it knows "
            f"{before or 'none'}); give their wavelengths in model.channel_specs or leave them out"
        )
    rows = torch.tensor([before.index(n) for n in after], dtype=torch.long)
    for name in BY_NAME:
        if name in state:
            state[name] = state[name].index_select(0, rows.to(state[name].device))
    new = build_model(new_cfg, init=False).to(next(model.parameters()).device)
    own = new.state_dict()
    for name in BY_NAME:  # no named channel left: the new model has no by-name tables (see by_name_table)
        if name in state and name not in own and not after:
            del state[name]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ConfigError(
            f"weights {wrong[:3]} of this run depend on its channel count ({len(cfg.channels)} channels, not "
            f"{len(channels)}): a linear hierarchy level is as wide as its largest group; train with "
            "cross-attention levels (model.hierarchy.preset: dchag-C) to read other channels"
        )
    new.load_state_dict(state, strict=True)
    return new_cfg, new.train(model.training)
