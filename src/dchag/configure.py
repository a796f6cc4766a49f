"""Load a run's config: fields (`config.py`), then the channel names and what depends on them.

`config.py` is the bottom layer: the schema, YAML and `--set` parsing, and checks of single fields. The
channel names come from the data layer (a count becomes the source's standard names; `all` reads a
spectral cube's wavelengths), and the checks that depend on them use the model's group arithmetic; this
module sits above all three and is the one entry point: `load_config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dchag.config import ChannelLists, Config, ConfigError, config_from_dict, parse_config
from dchag.data import channel_names, default_out_channels
from dchag.model.channel_spec import vocabulary_specs
from dchag.model.groups import resolve_level_groups


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply `key=value` overrides, validate, and resolve the
    channel names."""
    return resolve(parse_config(path, overrides))


def load_config_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """The same from a mapping (as `config.to_dict` writes it, e.g. inside a checkpoint)."""
    return resolve(config_from_dict(data, overrides))


def resolve(cfg: Config) -> Config:
    """`cfg` with its channel lists set, checked against the vocabulary, the hierarchy and the layout."""
    channels = channel_names(cfg.data)
    out = list(cfg.data.out_channels) if cfg.data.out_channels else default_out_channels(cfg.data, channels)
    cfg = dataclasses.replace(cfg, resolved=ChannelLists(tuple(channels), tuple(out)))
    check_channels(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_channels(cfg: Config) -> None:
    """What depends on the channel names: the vocabulary holds them, the forecast targets are among
    them, the hierarchy can group them, and every TP rank gets at least one level-1 group."""
    channels, vocab = cfg.channels, cfg.vocabulary
    missing = [c for c in channels if c not in vocab]
    _check(
        not missing,
        f"channel names {missing[:5]}{'...' if len(missing) > 5 else ''} are not in model.vocabulary "
        f"({len(vocab)} names); add them or drop them from data.channels",
    )
    vocabulary_specs(vocab, channels, cfg.model.channel_specs)  # one spec per channel, each valid
    if cfg.train.task == "forecast":
        bad = [c for c in cfg.out_channels if c not in channels]
        _check(not bad, f"data.out_channels {bad} are not among the input channels data.channels")
    sub = cfg.train.channel_subset
    _check(
        sub.p == 0 or sub.min <= len(channels),
        f"train.channel_subset.min={sub.min} is more than the {len(channels)} channels; use at most {len(channels)}",
    )
    h, p = cfg.model.hierarchy, cfg.parallel
    where = "model.hierarchy.levels" if h.levels else f"model.hierarchy (preset {h.preset}, groups={h.groups}) level"
    shapes = resolve_level_groups(h.resolved_levels(), len(channels), where)
    if p.mode == "dchag" and p.tp > 1:
        _check(
            len(shapes) >= 2,
            "parallel.mode=dchag needs a hierarchy of at least two levels (e.g. preset dchag-C); the flat model "
            "has nothing to distribute: use parallel.mode=replicated or naive",
        )
        _check(
            shapes[0][1] >= p.tp,
            f"level 1 of the hierarchy has {shapes[0][1]} groups, fewer than parallel.tp={p.tp}: every rank needs "
            f"at least one group; set model.hierarchy.groups >= {p.tp}",
        )
