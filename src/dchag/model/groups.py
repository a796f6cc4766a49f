"""The hierarchy's group arithmetic: how many tokens each level receives and how it splits them.

Pure integer arithmetic (no torch), shared by the model (`hierarchy.py`), the channel placement under
tensor parallelism (`parallel/channel_parallel.py`) and config validation.
"""

from __future__ import annotations

import math

from dchag.config import AGGREGATOR_KINDS, ConfigError, LevelConfig


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def split_sizes(total: int, groups: int) -> list[int]:
    """Contiguous near-equal split: the first `total % groups` groups get one more element."""
    base, extra = divmod(total, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]


def resolve_level_groups(
    levels: list[LevelConfig], num_channels: int, where: str = "model.hierarchy.levels"
) -> list[tuple[int, int]]:
    """For each level, (number of input tokens, number of groups); raises on impossible shapes."""
    shapes = []
    tokens_in = num_channels
    for i, level in enumerate(levels):
        key = f"{where}[{i}]"
        _check(level.kind in AGGREGATOR_KINDS, f"{key}.kind={level.kind!r} is unknown; use one of {AGGREGATOR_KINDS}")
        _check(level.tokens >= 1, f"{key}.tokens={level.tokens} must be >= 1")
        if level.groups is not None and level.group_size is not None:
            raise ConfigError(f"{key}: give groups or group_size, not both")
        if level.group_size is not None:
            _check(level.group_size >= 1, f"{key}.group_size={level.group_size} must be >= 1")
            groups = math.ceil(tokens_in / level.group_size)
        else:
            groups = level.groups if level.groups is not None else 1
        _check(groups >= 1, f"{key}.groups={groups} must be >= 1")
        _check(
            groups <= tokens_in,
            f"{key}.groups={groups} is larger than the {tokens_in} tokens this level receives "
            f"({'channels' if i == 0 else 'outputs of the level before'}); use at most {tokens_in} groups",
        )
        shapes.append((tokens_in, groups))
        tokens_in = groups * level.tokens
    _check(
        tokens_in == 1,
        f"model.hierarchy: the last level must reduce to 1 token per patch, it gives {tokens_in}; "
        "end with a level of groups=1, tokens=1",
    )
    return shapes
