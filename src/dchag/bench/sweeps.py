"""Benchmark sweeps behind `dchag bench --sweep NAME`: each returns a list of flat JSON records and has
a table that puts the variants side by side as ratios. A new sweep adds a module and a line in SWEEPS.
The planner's `paper-plan` sweep is added in `dchag.planning.sweeps` (the planner sits above bench).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Callable

from dchag.bench.accuracy_sweep import AccuracySize, accuracy_cpu, accuracy_summary, accuracy_table
from dchag.bench.channel_parallel_sweep import ChannelParallelSize, channel_parallel_cpu, channel_parallel_table
from dchag.bench.cp_sweep import CPSize, cp_cpu, cp_table
from dchag.bench.fused_sweep import FusedSweepSize, fused_cpu
from dchag.bench.paper_sweep import PaperSize, paper_cpu, paper_table
from dchag.bench.report import fused_table
from dchag.bench.tp_comm_sweep import TPCommSize, tp_comm_cpu, tp_comm_table

# name -> (size dataclass, run(size) -> records, table(records) -> Markdown)
SWEEPS: dict[str, tuple[type, Callable, Callable]] = {
    "fused-cpu": (FusedSweepSize, fused_cpu, fused_table),
    "channel-parallel-cpu": (ChannelParallelSize, channel_parallel_cpu, channel_parallel_table),
    "tp-comm-cpu": (TPCommSize, tp_comm_cpu, tp_comm_table),
    "accuracy-cpu": (AccuracySize, accuracy_cpu, accuracy_table),
    "paper-cpu": (PaperSize, paper_cpu, paper_table),
    "cp-cpu": (CPSize, cp_cpu, cp_table),
}
# name -> summary(records) -> list of rows, written beside the records as "summary"
SUMMARIES: dict[str, Callable] = {"accuracy-cpu": accuracy_summary}


def sweep_size(name: str, overrides: list[str], sweeps: dict | None = None):
    """The sweep's size dataclass with `key=value` overrides applied (values parsed as YAML); the sweep
    is looked up in `sweeps` (default: SWEEPS)."""

    from dchag.config import ConfigError, parse_override

    cls = (SWEEPS if sweeps is None else sweeps)[name][0]
    size = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for text in overrides:
        key, _, raw = text.partition("=")
        if key not in fields:
            raise ConfigError(f"unknown bench setting {key!r} for sweep {name!r} (known: {', '.join(fields)})")
        value = _coerce(parse_override(text)[1] if raw.strip() else None, hints[key])
        if value is None:
            raise ConfigError(f"bench setting {text!r} for sweep {name!r}: expected {_describe(hints[key])}")
        size = dataclasses.replace(size, **{key: value})
    return size


def _fits(value, kind: type) -> bool:
    """YAML scalar `value` is a `kind` (bool is not an int here; an int is a float)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _coerce(value, hint):
    """`value` as the field's type, or None. `tuple[T, ...]` takes a list or one scalar (a one-element
    list: `channels=512` sweeps one size); `tuple[T, T]` takes exactly two."""
    if typing.get_origin(hint) is not tuple:
        return value if _fits(value, hint) else None
    args = typing.get_args(hint)
    open_ended = len(args) == 2 and args[1] is Ellipsis
    items = value if isinstance(value, list) else [value] if open_ended else None
    if items is None or (not open_ended and len(items) != len(args)) or (open_ended and not items):
        return None
    kinds = [args[0]] * len(items) if open_ended else list(args)
    return tuple(items) if all(_fits(v, k) for v, k in zip(items, kinds)) else None


def _describe(hint) -> str:
    if typing.get_origin(hint) is not tuple:
        return f"one {hint.__name__}"
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return f"one {args[0].__name__} or a list of them, e.g. [1, 2]"
    return f"a list of {len(args)} values ({', '.join(a.__name__ for a in args)}), e.g. [64, 128]"
