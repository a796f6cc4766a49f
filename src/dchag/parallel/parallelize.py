"""Apply parallelism to a finished single-device model: channel-parallel front end, tensor-parallel
ViT blocks (DTensor), activation checkpointing, torch.compile, FSDP2 over the data-parallel dimensions.

The returned `ParallelPlan` is what the training loop needs to know about the layout: which channels
this rank loads, how to finish gradients and clip them, how to get the logical (single-device) weights.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from dchag.model.heads import ConditionedPixelOutput
from dchag.model.parts import Parts, freeze_parts, part_square_sums
from dchag.parallel.channel_parallel import ChannelPlacement, ParallelFrontEnd, ShardSpec, place_channels
from dchag.parallel.collectives import copy_to_tp, reduce_from_tp
from dchag.parallel.context_parallel import StripLayout, apply_context_parallel
from dchag.parallel.gradients import finish_gradients
from dchag.parallel.mesh import FSDP_SHARD_CP, ParallelDims, dp_mesh, dp_rank_and_size, fsdp_shard_dim, submesh

# One ViT block under TP needs one all-reduce forward and one backward per sub-layer (attention, MLP).
# q, k and v read the same input: PrepareModuleInput turns it into one replicated DTensor at the
# attention's entrance, so their three partial input gradients are summed locally and all-reduced once
# (without it each ColwiseParallel all-reduces its own: three backward all-reduces instead of one).
BLOCK_TP_PLAN = {
    "attn": PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
    ),
    "attn.wq": ColwiseParallel(),
    "attn.wk": ColwiseParallel(),
    "attn.wv": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(),
}


@dataclass
class ChannelShard:
    """This rank's slice [start, stop) of `total` channels, for losses over all channels (MAE): the
    model predicts only these channels, and per-patch errors are summed over the TP group."""

    start: int
    stop: int
    total: int
    group: object
    out_index: list[int] = field(default_factory=list)  # forecast: this rank's positions in the output list
    total_out: int = 0  # forecast: the number of output channels over all ranks

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(partial, self.group)


class ChannelColumnLinear(nn.Linear):
    """The rows [`rows`] of a linear layer whose outputs are per-channel pixels: this rank's channels.

    Its input enters through `copy_to_tp` (every rank's rows contribute to the input's gradient), so
    backward all-reduces a [B, L, d_in] gradient instead of a full-channel [B, C, H, W] one.
    """

    def __init__(self, full: nn.Linear, rows: torch.Tensor, group):
        with warnings.catch_warnings():  # a rank may own no rows: "initializing zero-element tensors"
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(full.in_features, len(rows), bias=full.bias is not None, device=full.weight.device)
        with torch.no_grad():
            self.weight.copy_(full.weight[rows])
            if full.bias is not None:
                self.bias.copy_(full.bias[rows])
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(copy_to_tp(x, self.group))


class ChannelColumnOutput(nn.Module):
    """A wavelength-conditioned pixel output (`ConditionedPixelOutput`) for this rank's output channels
    only: their weights alone are generated. The generator and by-name tables are whole on every rank
    (each rank's channels give part of their gradient); the input enters through `copy_to_tp`, as
    ChannelColumnLinear's."""

    def __init__(self, full: ConditionedPixelOutput, positions: list[int], group):
        super().__init__()
        self.inner = full.subset(positions)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, L, C_r*p*p]
        return self.inner(copy_to_tp(x, self.group))


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
    strip: StripLayout | None = None  # context parallelism: this rank's strip of patch rows (cp > 1)

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def cp(self) -> int:
        return self.dims.cp

    @property
    def tp_group(self):
        return self.mesh["tp"].get_group()

    def finish_gradients(self) -> None:
        """Make the gradients those of the single-device model, in the local layout.

        1. A parameter without a gradient gets zeros, as on one device, where every parameter takes part
           (vocabulary rows no channel uses, kept on TP rank 0 only, would otherwise skip AdamW's weight
           decay and drift from the single-device model).
        2. Gradients that each TP rank computed only in part (ShardSpec.partial_grad) are summed over TP,
           all in one flat all-reduce.
        (Under context parallelism each CP rank computed its strip's part of every gradient: FSDP2, which
        shards over dp_shard x cp, sums them in its reduce-scatter.)
        """
        finish_gradients(self.model.named_parameters(), self.specs, self.tp_group, self.tp)

    def _tp_replicated(self, name: str, param: torch.Tensor) -> bool:
        """Whether every TP rank holds the same values of this (local) parameter."""
        if isinstance(param, DTensor):
            dims = param.device_mesh.mesh_dim_names or ()
            if "tp" in dims and not param.placements[dims.index("tp")].is_replicate():
                return False
        spec = self.specs.get(name)
        return spec is None or spec.dim is None or not spec.tp_disjoint

    def replica_checksums(self) -> tuple[list[str], torch.Tensor]:
        """Names and checksums [N, 2] (L1 and L2 norm, float64) of the TP-replicated parameters, from two
        foreach kernels. Replicas receive bit-identical updates, so their checksums agree exactly."""
        names, tensors = [], []
        for name, param in self.model.named_parameters():
            if self._tp_replicated(name, param):
                names.append(name)
                tensors.append((param.to_local() if isinstance(param, DTensor) else param).detach())
        if not tensors:
            return names, torch.zeros(0, 2, dtype=torch.float64, device=next(self.model.parameters()).device)
        l1 = torch.stack(torch._foreach_norm(tensors, 1))
        l2 = torch.stack(torch._foreach_norm(tensors, 2))
        return names, torch.stack([l1, l2], dim=1).double()

    def check_replicas(self, step: int) -> None:
        """Compare replica checksums across the TP group (one small all-gather) and agree over all ranks
        (one all-reduce of a flag); on any difference every rank raises the same `ReplicaDivergence`, naming
        the first parameter and the ranks, so no rank is left waiting in a collective. (CP ranks hold no
        replicas: FSDP2 shards the weights over dp_shard x cp whenever cp > 1.)"""
        groups = [("TP", self.mesh["tp"], self.replica_checksums())] if self.tp > 1 else []
        if not groups:
            return
        stacked = []  # per group: every member's checksums [R, N, 2]
        for _, group, (_, sums) in groups:
            everyone = [torch.empty_like(sums) for _ in range(group.size())]
            dist.all_gather(everyone, sums, group=group.get_group())
            stacked.append(torch.stack(everyone))
        differs = [(s != s[:1]).any(dim=2).any(dim=0) for s in stacked]  # per group [N]
        flag = torch.stack([d.any() for d in differs]).any().to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank, every group, the same decision
        if not bool(flag):
            return
        message = ""
        for (label, group, (names, _)), every, diff in zip(groups, stacked, differs):
            if message or group.get_local_rank() != 0 or not bool(diff.any()):  # one report per group
                continue
            i = int(diff.nonzero()[0, 0])
            ranks = [r for r in range(group.size()) if not torch.equal(every[r, i], every[0, i])]
            message = (
                f"step {step}: parameter {names[i]!r} (and {int(diff.sum()) - 1} more) differs between {label} "
                f"rank 0 and {label} rank(s) {ranks} (L1 norm {every[0, i, 0]:.9g} vs {every[ranks[0], i, 0]:.9g})"
            )
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        found = [m for m in messages if m]
        where = f" (in {len(found)} groups)" if len(found) > 1 else ""
        raise ReplicaDivergence(
            f"{found[0]}{where}; replicated weights must stay identical: check for rank-dependent randomness "
            "or data, then resume from the last checkpoint"
        )

    def _local_grad_entries(self) -> Iterator[tuple[str, torch.Tensor, bool, bool]]:
        """(single-device name, this rank's gradient tensor (the local shard of a DTensor), split over
        dp_shard?, split over TP?) of every parameter with a gradient: the elements of a split gradient
        live on one rank only and are summed across ranks."""
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            grad, dp_split, tp_split = param.grad, False, False
            if isinstance(grad, DTensor):
                dims = grad.device_mesh.mesh_dim_names or ()
                # a placement that is neither replicated nor partial splits the tensor: Shard, and the
                # _StridedShard that FSDP2 uses on top of TP (not a Shard subclass)
                split = {dim for dim, pl in zip(dims, grad.placements) if not (pl.is_replicate() or pl.is_partial())}
                dp_split, tp_split = bool(split & {"dp_shard", FSDP_SHARD_CP}), "tp" in split
                grad = grad.to_local()
            spec = self.specs.get(name)
            if spec is not None and spec.dim is not None and spec.tp_disjoint:
                tp_split = True
            yield (spec.logical_name if spec is not None else name), grad.detach(), dp_split, tp_split

    def _local_grads(self) -> dict[tuple[bool, bool], list[torch.Tensor]]:
        """This rank's gradient tensors bucketed by (split over dp_shard?, split over TP?), each once."""
        buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
        for _, grad, dp_split, tp_split in self._local_grad_entries():
            buckets.setdefault((dp_split, tp_split), []).append(grad)
        return buckets

    def dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks of `value`, which TP peers hold alike (no gradient): one
        all-reduce over every rank, divided by the world size (each TP peer adds the same value)."""
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / dist.get_world_size()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, each logical element counted once, as a 0-d float64 tensor on
        the model's device (no host synchronisation)."""
        return self.part_grad_norms({"all": ("",)})[0]

    def part_grad_norms(self, parts: Parts) -> torch.Tensor:
        """[P] float64 on the model's device: the L2 norm of the gradients of each part of `parts` (part
        name -> prefixes of single-device parameter names, e.g. `model.parts.grad_norm_parts`), in its
        order, each logical element counted once: what the single-device model's gradients of that part
        give. A rank's parameter counts under its single-device name (`specs`), so the parts read the
        same under TP's `ParallelFrontEnd`. No host synchronisation.

        Each (part, split) bucket's squared norm comes from one foreach kernel; every rank reduces the
        dp-split sums of all parts together over dp_shard, then the tp-split sums over TP, so the
        collectives match even where ranks hold different parameters (two at most, whatever the parts).
        """
        device = next(self.model.parameters()).device
        entries = ((name, grad, 2 * dp + tp) for name, grad, dp, tp in self._local_grad_entries())
        sums = part_square_sums(entries, parts, 4, device).view(-1, 2, 2)  # [P, dp-split, tp-split]
        shard = submesh(self.mesh, fsdp_shard_dim(self.mesh))  # FSDP2's shard dimension (x cp)
        if self.dims.fsdp and shard.size() > 1:
            dp_split = sums[:, 1].clone()
            dist.all_reduce(dp_split, group=shard.get_group())
            sums[:, 1] = dp_split
        if self.tp > 1:
            tp_split = sums[:, :, 1].clone()
            dist.all_reduce(tp_split, group=self.tp_group)
            sums[:, :, 1] = tp_split
        return sums.sum(dim=(1, 2)).sqrt()

    def clip_grad_norm_(self, max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
        """Scale all gradients so that their global norm is at most `max_norm` (0: no clipping); returns
        the norm before clipping. No host synchronisation: the scale stays a tensor."""
        norm = self.grad_norm() if norm is None else norm
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grads in self._local_grads().values():
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        return norm


class ReplicaDivergence(RuntimeError):
    """Parameters that must be identical on every TP rank are not (raised on every rank alike)."""


def _splittable_decoder_blocks(head: nn.Module, tp: int) -> list[nn.Module]:
    """The MAE decoder's blocks, which run on every TP rank's whole sequence, sharded like the encoder's
    where TP splits their heads and MLP width evenly; otherwise (a narrow decoder with few heads) none,
    and they stay whole on every rank."""
    blocks = list(getattr(head, "blocks", ()))
    if not blocks:
        return []
    attn, hidden = blocks[0].attn, blocks[0].mlp.fc1.out_features
    heads = attn.wq.out_features // attn.head_dim
    return blocks if heads % tp == 0 and hidden % tp == 0 else []


def even_shard_placement(ranks: int, keep: set[int] = frozenset()):
    """FSDP2's shard placement per parameter: dimension 0 (its default) unless that dimension does not
    split evenly over `ranks` while a later one does. FSDP2 pads an uneven dimension 0 to the group size,
    so a parameter whose first dimension is small - the position embedding [1, L, D], a level's stacked
    weights [G, D, D] with G < ranks - would otherwise stay whole on every rank with its gradient and AdamW
    state, which under context parallelism (FSDP2 over dp_shard x cp) is most of what cp should save.
    Tensor-parallel DTensors and the parameters in `keep` (ids) keep the default (FSDP2 strides DTensors
    over TP's own sharding)."""

    def place(param: nn.Parameter):
        if id(param) in keep or isinstance(param, DTensor) or param.ndim == 0 or param.shape[0] % ranks == 0:
            return None  # FSDP2's default, Shard(0)
        even = [d for d in range(1, param.ndim) if param.shape[d] % ranks == 0]
        return Shard(even[0]) if even else None

    return place


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

    # 2. tensor parallelism for the ViT blocks (heads and MLP columns sharded); each rank's heads draw
    #    their attention-dropout masks from their own stream (see model.vit.attend)
    if dims.tp > 1:
        for block in [*model.blocks, *_splittable_decoder_blocks(model.head, dims.tp)]:
            parallelize_module(block, tp_mesh, BLOCK_TP_PLAN)
            block.attn.dropout_streams = (tp_rank, 1)
    # Under channel parallelism each rank predicts only its own channels (the output rows of the MAE
    # decoder or the forecast head for them): the prediction and its gradient never exist at full
    # channel width, and a rank reads only its own channels' targets
    if shard is not None:
        patch_px = cfg.model.patch_size**2
        if cfg.train.task == "mae":
            owned, name = list(range(c0, c1)), "head.pred"
        else:
            mine = set(channels[c0:c1])
            owned, name = [k for k, c in enumerate(cfg.out_channels) if c in mine], "head.out"
            shard.out_index, shard.total_out = owned, len(cfg.out_channels)
        rows = torch.tensor([k * patch_px + i for k in owned for i in range(patch_px)], dtype=torch.long)
        head = model.head
        linear = head.pred if cfg.train.task == "mae" else head.out
        if isinstance(linear, ConditionedPixelOutput):  # weights from wavelengths: generated for owned channels
            local = ChannelColumnOutput(linear, owned, tp_group)
            for pname, _ in local.inner.named_parameters():  # whole on every rank, each rank's channels give part
                specs[f"{name}.inner.{pname}"] = ShardSpec(f"{name}.{pname}", partial_grad=dims.tp > 1)
        else:
            local = ChannelColumnLinear(linear, rows, tp_group)
            specs[f"{name}.weight"] = ShardSpec(f"{name}.weight", 0, rows)
            specs[f"{name}.bias"] = ShardSpec(f"{name}.bias", 0, rows)
        if cfg.train.task == "mae":
            head.pred, head.channels = local, len(owned)
        else:
            head.out, head.out_channels = local, len(owned)
            if model.residual:  # the owned outputs' inputs, as positions among this rank's channels
                local_names = channels[c0:c1]
                index = [local_names.index(cfg.out_channels[k]) for k in owned]
                model.residual_from = torch.tensor(index, dtype=torch.long, device=model.residual_from.device)
    # context parallelism: this rank computes its strip of patch rows; attention gathers keys and values
    strip = apply_context_parallel(model, cfg, mesh["cp"]) if dims.cp > 1 else None
    # 3. activation checkpointing and compilation, per block
    for block in model.blocks:
        if p.activation_checkpointing:
            _checkpointed(block)
        if p.compile:
            block.compile()
    # 4. parts left untrained (train.freeze) are marked before FSDP2 shards them, which keeps the flag
    freeze_parts(model, cfg.train.freeze)
    # 5. FSDP2 over the data-parallel dimensions (dp_shard x cp: CP ranks share weights): each block, then the root
    if dims.fsdp:
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if p.bf16_params
            else MixedPrecisionPolicy()
        )
        fsdp_mesh = dp_mesh(mesh)
        # An MAE model returns its decoder's output as nn.Linear gives it, a view of a [B*L, C*p*p] matmul;
        # FSDP2 warns that an in-place op on a view output would drop its pre-backward hook. Nothing does
        # one (the loss reads the output; training's loss reuses its storage only inside its own backward).
        # Only the root model's warning is silenced: FSDP's warning for other modules stays.
        root = re.escape(type(model).__name__)  # fully_shard renames the class FSDP<name>
        warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \((FSDP)?{root}\) returned a view tensor")
        # parameters split over TP by group or row (ShardSpec.dim) keep dimension 0: checkpoint padding and
        # init_from read their FSDP shards as rows of that dimension
        by_rows = {id(q) for n, q in model.named_parameters() if specs.get(n) is not None and specs[n].dim is not None}
        place = even_shard_placement(fsdp_mesh.size(fsdp_mesh.ndim - 1), keep=by_rows)
        for block in model.blocks:
            fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, shard_placement_fn=place)
        # a parameter without elements on this rank (the forecast head of a TP rank that owns none of the
        # output channels) has nothing to shard or reduce, and FSDP's gradient reduction fails on it
        empty = {q for q in model.parameters() if q.numel() == 0}
        fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, ignored_params=empty or None, shard_placement_fn=place)
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
        strip=strip,
    )
