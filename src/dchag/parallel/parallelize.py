"""Apply parallelism to a finished single-device model: channel-parallel front end, tensor-parallel
ViT blocks (DTensor), activation checkpointing, torch.compile, FSDP2 over the data-parallel dimensions.

The returned `ParallelPlan` is what the training loop needs to know about the layout: which channels
this rank loads, how to finish gradients and clip them, how to get the logical (single-device) weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import checkpoint

from dchag.parallel.channel_parallel import ChannelPlacement, ParallelFrontEnd, ShardSpec, place_channels
from dchag.parallel.collectives import copy_to_tp, reduce_from_tp
from dchag.parallel.mesh import ParallelDims, dp_mesh, dp_rank_and_size

BLOCK_TP_PLAN = {
    "attn.wq": ColwiseParallel(),
    "attn.wk": ColwiseParallel(),
    "attn.wv": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(),
}


@dataclass
class ChannelShard:
    """This rank's slice [start, stop) of `total` channels, for losses over all channels (MAE)."""

    start: int
    stop: int
    total: int
    group: object

    def enter(self, full: torch.Tensor) -> torch.Tensor:
        """A replicated full-channel prediction -> its local channels (gradient summed over TP)."""
        return copy_to_tp(full, self.group)[:, self.start : self.stop]

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(partial, self.group)


@dataclass
class ParallelPlan:
    model: nn.Module
    mesh: DeviceMesh
    dims: ParallelDims
    placement: ChannelPlacement
    specs: dict[str, ShardSpec]  # full parameter name -> where it lives in the single-device model
    logical_shapes: dict[str, torch.Size]
    input_channels: list[str]  # names of the channels this rank loads
    channel_shard: ChannelShard | None  # set when this rank does not see every channel
    tp_rank: int
    dp_rank: int
    dp_size: int

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def tp_group(self):
        return self.mesh["tp"].get_group()

    def finish_gradients(self) -> None:
        """Sum over TP the gradients that each TP rank computed only in part (see ShardSpec.partial_grad)."""
        if self.tp == 1:
            return
        for name, param in self.model.named_parameters():
            spec = self.specs.get(name)
            if spec is not None and spec.partial_grad and param.grad is not None:
                grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                dist.all_reduce(grad, group=self.tp_group)

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, each logical element counted once.

        Squared sums go to four buckets by (split over dp_shard?, split over TP?); every rank reduces the
        dp-split pair over dp_shard, then the tp-split pair over TP, so the collectives match even where
        ranks hold different parameters.
        """
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        buckets = torch.zeros(2, 2, dtype=torch.float64, device=device)  # [dp-split, tp-split]
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            grad, dp_split, tp_split = param.grad, False, False
            if isinstance(grad, DTensor):
                dims = grad.device_mesh.mesh_dim_names or ()
                # a placement that is neither replicated nor partial splits the tensor: Shard, and the
                # _StridedShard that FSDP2 uses on top of TP (not a Shard subclass)
                split = {dim for dim, pl in zip(dims, grad.placements) if not (pl.is_replicate() or pl.is_partial())}
                dp_split, tp_split = "dp_shard" in split, "tp" in split
                grad = grad.to_local()
            spec = self.specs.get(name)
            if spec is not None and spec.dim is not None and spec.tp_disjoint:
                tp_split = True
            buckets[int(dp_split), int(tp_split)] += grad.detach().to(device, torch.float64).square().sum()
        if self.mesh["dp_shard"].size() > 1:
            dp_pair = buckets[1].clone()
            dist.all_reduce(dp_pair, group=self.mesh["dp_shard"].get_group())
            buckets[1] = dp_pair
        if self.tp > 1:
            tp_pair = buckets[:, 1].clone()
            dist.all_reduce(tp_pair, group=self.tp_group)
            buckets[:, 1] = tp_pair
        return buckets.sum().cpu().sqrt()

    def clip_grad_norm_(self, max_norm: float) -> float:
        norm = float(self.grad_norm())
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
        return norm


def _checkpointed(module: nn.Module) -> None:
    """Recompute `module` in backward; the forward is replaced in place so parameter names stay."""
    forward = module.forward
    module.forward = functools.partial(checkpoint, forward, use_reentrant=False)


def parallelize(model: nn.Module, cfg, mesh: DeviceMesh) -> ParallelPlan:
    """Turn the single-device `model` (weights already set) into this rank's part, in place."""
    p = cfg.parallel
    dims = ParallelDims.from_config(p)
    tp_mesh = mesh["tp"]
    tp_rank, tp_group = tp_mesh.get_local_rank(), tp_mesh.get_group()
    dp_rank, dp_size = dp_rank_and_size(mesh)
    logical_shapes = {k: v.shape for k, v in model.state_dict().items()}

    # 1. the front end: channels and level-1 groups placed on TP ranks
    placement = place_channels(model.front_end, dims.tp, p.mode)
    front = ParallelFrontEnd(model.front_end, placement, tp_rank, dims.tp, tp_group)
    model.front_end = front
    specs = {f"front_end.{k}": v for k, v in front.specs.items()}
    c0, c1 = placement.channel_ranges[tp_rank]
    channels = cfg.channels
    shard = ChannelShard(c0, c1, len(channels), tp_group) if (c1 - c0) < len(channels) else None

    # 2. tensor parallelism for the ViT blocks (heads and MLP columns sharded)
    if dims.tp > 1:
        for block in model.blocks:
            parallelize_module(block, tp_mesh, BLOCK_TP_PLAN)
    # 3. activation checkpointing and compilation, per block
    for block in model.blocks:
        if p.activation_checkpointing:
            _checkpointed(block)
        if p.compile:
            block.compile()
    # 4. FSDP2 over the data-parallel dimensions: each block, then the root
    if dims.dp > 1:
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if p.bf16_params
            else MixedPrecisionPolicy()
        )
        fsdp_mesh = dp_mesh(mesh)
        for block in model.blocks:
            fully_shard(block, mesh=fsdp_mesh, mp_policy=mp)
        fully_shard(model, mesh=fsdp_mesh, mp_policy=mp)
        for module in model.modules():  # plain sums (gloo has no AVG/PREMUL_SUM): the loss carries 1/dp
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    return ParallelPlan(
        model=model,
        mesh=mesh,
        dims=dims,
        placement=placement,
        specs=specs,
        logical_shapes=logical_shapes,
        input_channels=channels[c0:c1],
        channel_shard=shard,
        tp_rank=tp_rank,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
