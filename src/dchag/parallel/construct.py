"""Build a rank's part of the model without ever holding the whole model.

1. The single-device model is constructed with its parameters on the meta device (shapes only; each
   parameter exists in memory only while its constructor runs, then moves to meta). Buffers (channel
   indices, group layouts) stay real: they are small and computed, not learned.
2. `parallelize` cuts it down on meta: channel shards, TP slices, FSDP shards cost nothing yet.
3. The rank's local parameters are allocated (`to_empty`), buffers kept.
4. The initial values are generated one logical parameter at a time from the config's seed
   (`model.init.initial_values`), and each rank copies in the chunks it holds (`logical_shards`, the
   mapping checkpoints use) before the next one is generated.

So a rank's peak while building is its own parameters plus one whole logical parameter, and its values
are exactly those of `build_model(cfg)` with the same seed: parity and logical checkpoints hold.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dchag.model import build_model
from dchag.model.init import initial_values
from dchag.parallel.logical_shards import logical_shards
from dchag.parallel.parallelize import ParallelPlan, parallelize


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside moves to the meta device at once; buffers stay where they are."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def allocate(model: nn.Module, device: torch.device) -> None:
    """Give the (meta) parameters uninitialised storage on `device`; keep the buffers' values."""
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value.to(device)


def _slices(offsets: tuple[int, ...], shape: torch.Size) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, shape))


def build_parallel_model(cfg, mesh: DeviceMesh, device: torch.device) -> ParallelPlan:
    """This rank's parallel model (weights as `build_model(cfg)` would hold them), built shard by shard."""
    with parameters_on_meta():
        model = build_model(cfg, init=False)
    logical = copy.deepcopy(model).to("meta")  # the single-device structure for the initial values: no memory
    plan = parallelize(model, cfg, mesh)
    allocate(plan.model, device)
    shards = logical_shards(plan.model, plan, lambda p: p)
    with torch.no_grad():
        for name, value in initial_values(logical, cfg.train.seed):
            for chunk in shards[name].chunks if name in shards else ():
                chunk.local.copy_(value[_slices(chunk.offsets, chunk.local.shape)])
            del value  # one whole logical parameter at a time
    return plan
