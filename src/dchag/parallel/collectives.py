"""Autograd-aware collectives over the tensor- and context-parallel groups, each named by its
forward/backward pair.

| function             | forward                         | backward                          |
|----------------------|---------------------------------|-----------------------------------|
| `copy_to_tp`         | identity                        | all-reduce (sum)                  |
| `reduce_from_tp`     | all-reduce (sum)                | identity                          |
| `gather_from_tp`     | all-gather, concatenate on dim  | keep this rank's slice (no comm)  |
| `gather_to_tp`       | all-gather, concatenate on dim  | reduce-scatter (sum, own slice)   |
| `gather_to_cp`       | all-gather, concatenate on dim  | reduce-scatter (sum, own slice)   |
| `reduce_from_cp`     | all-reduce (sum)                | identity                          |

Each autograd Function is named by its pair (`_AllGatherReduceScatter`, ...) and takes the group; the
`*_tp` and `*_cp` functions name where it is used. Context parallelism (CP: each rank holds a strip of
the image's tokens) uses two of the pairs over the CP group. `gather_to_cp` is the attention's
key/value exchange: every rank's queries read every rank's keys and values, so the gradient of the
gathered keys and values on each rank is that rank's part of their gradient, and backward sums the
parts onto the rank that owns each strip. `reduce_from_cp` adds the strips' loss sums. (On CUDA,
`torch.distributed.tensor.experimental.context_parallel` offers ring attention for SDPA's kernels; the
all-gather here is what runs everywhere, gloo included.)

`*_to_tp` enter a region whose ranks each compute part of the result (heads, columns): the gradient
that comes back is a per-rank partial sum, so backward sums it. `*_from_tp` leave such a region.

D-CHAG's gather has two forms. When the module after it runs whole on every rank (its input gradient
is complete everywhere), `gather_from_tp` keeps the own slice. When the module after it is the
head-parallel last level (its input gradient is partial), `gather_to_tp` reduce-scatters: this is
`copy_to_tp` followed by `gather_from_tp` in one collective that moves half the bytes of an all-reduce.
Using `gather_to_tp` where the gradient is already complete (what torch's autograd all-gathers,
`torch.distributed.nn.functional.all_gather` and functional collectives, always do) multiplies the
gradients by the TP size: the parity checks inject exactly that fault.

All work on gloo (CPU) and NCCL; tensors gathered must have the same shape on every rank (pad first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.12 renames reduce_scatter_tensor (and warns on the old name); 2.8 has only the old one
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _IdentityAllReduce(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) the gradient over `group`."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _AllReduceIdentity(torch.autograd.Function):
    """Forward: all-reduce (sum) over `group`. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllGatherOwnSlice(torch.autograd.Function):
    """Forward: all-gather over `group` and concatenate along `dim` in rank order. Backward: keep this
    rank's slice of the gradient (no communication)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        world = dist.get_world_size(group)
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


class _AllGatherReduceScatter(torch.autograd.Function):
    """Forward: all-gather over `group` and concatenate along `dim` in rank order. Backward:
    reduce-scatter (sum the ranks' partial gradients, keep this rank's slice)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        world = dist.get_world_size(group)
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        full = grad.movedim(ctx.dim, 0).contiguous()  # reduce_scatter_tensor splits dim 0
        own = full.new_empty(full.shape[0] // world, *full.shape[1:])
        _reduce_scatter(own, full, group=ctx.group)
        return own.movedim(0, ctx.dim).contiguous(), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward: enter a region whose ranks each hold part of a computation."""
    return _IdentityAllReduce.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: leave such a region by summing the partial results."""
    return _AllReduceIdentity.apply(x, group)


def gather_from_tp(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather forward along `dim`, own-slice backward (the D-CHAG gather before modules that run
    whole on every rank)."""
    return _AllGatherOwnSlice.apply(x, group, dim)


def gather_to_tp(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather forward along `dim`, reduce-scatter backward (the D-CHAG gather straight into the
    head-parallel last level)."""
    return _AllGatherReduceScatter.apply(x, group, dim)


def gather_to_cp(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather forward along `dim`, reduce-scatter backward: every CP rank's keys and values (stacked
    into one tensor, one collective) for attention over the whole sequence."""
    return _AllGatherReduceScatter.apply(x, group, dim)


def reduce_from_cp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: a loss's sums over the strips of the CP group (each rank's
    own part of the gradient flows back to its own strip)."""
    return _AllReduceIdentity.apply(x, group)
