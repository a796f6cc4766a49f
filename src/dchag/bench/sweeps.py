"""Benchmark sweeps behind `dchag bench --sweep NAME`: each returns a list of flat JSON records and has
a table that puts the variants side by side as ratios. A new sweep adds a module and a line in SWEEPS.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dchag.bench.accuracy_sweep import AccuracySize, accuracy_cpu, accuracy_table
from dchag.bench.channel_parallel_sweep import ChannelParallelSize, channel_parallel_cpu, channel_parallel_table
from dchag.bench.fused_sweep import FusedSweepSize, fused_cpu
from dchag.bench.paper_sweep import PaperSize, paper_cpu, paper_table
from dchag.bench.report import fused_table
from dchag.bench.tp_comm_sweep import TPCommSize, tp_comm_cpu, tp_comm_table
from dchag.planning.paper_table import PaperPlanSize, paper_plan, paper_plan_table

# name -> (size dataclass, run(size) -> records, table(records) -> Markdown)
SWEEPS: dict[str, tuple[type, Callable, Callable]] = {
    "fused-cpu": (FusedSweepSize, fused_cpu, fused_table),
    "channel-parallel-cpu": (ChannelParallelSize, channel_parallel_cpu, channel_parallel_table),
    "tp-comm-cpu": (TPCommSize, tp_comm_cpu, tp_comm_table),
    "accuracy-cpu": (AccuracySize, accuracy_cpu, accuracy_table),
    "paper-cpu": (PaperSize, paper_cpu, paper_table),
    "paper-plan": (PaperPlanSize, paper_plan, paper_plan_table),
}


def sweep_size(name: str, overrides: list[str]):
    """The sweep's size dataclass with `key=value` overrides applied (values parsed as YAML)."""
    import yaml

    from dchag.config import ConfigError

    cls = SWEEPS[name][0]
    size = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for text in overrides:
        key, _, raw = text.partition("=")
        if key not in fields:
            raise ConfigError(f"unknown bench setting {key!r} for sweep {name!r} (known: {', '.join(fields)})")
        value = yaml.safe_load(raw)
        if isinstance(getattr(size, key), tuple):
            value = tuple(value)
        size = dataclasses.replace(size, **{key: value})
    return size
