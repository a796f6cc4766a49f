"""One rank alone in a process, its peers faked: the stand-in both `paper-cpu --simulate-tp` (one rank
measured on one device) and the planner's traces (one rank on fake tensors) run under."""

from __future__ import annotations

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int):
    """torch's fake process group as the default group: collectives return at once, moving nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dchag.config import ConfigError

    if dist.is_initialized():
        raise ConfigError("this runs one rank alone in a single process; do not launch it with torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
