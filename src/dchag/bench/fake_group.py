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
    _forget_meshes()  # whatever ran before in this process
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _forget_meshes()


def _forget_meshes() -> None:
    """Drop DTensor's cached sharding and redistribution plans. They are keyed by device meshes, which
    compare equal by ranks and names, not by process groups: the next layout traced in this process (a
    "tp" mesh of the same ranks) would reuse plans that name this layout's groups, and its collectives
    would run on (and be counted for) groups that no longer exist."""
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
