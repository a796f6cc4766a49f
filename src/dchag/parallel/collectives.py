"""Autograd-aware collectives over the tensor-parallel group, each named by its forward/backward pair.

| function             | forward                         | backward                          |
|----------------------|---------------------------------|-----------------------------------|
| `copy_to_tp`         | identity                        | all-reduce (sum)                  |
| `reduce_from_tp`     | all-reduce (sum)                | identity                          |
| `gather_from_tp`     | all-gather, concatenate on dim  | keep this rank's slice (no comm)  |

`gather_from_tp` is D-CHAG's gather: the gradient that reaches it is already complete on every rank
(the next module's input gradient is all-reduced by `copy_to_tp`), so each rank keeps its own slice.
The autograd all-gathers in torch (`torch.distributed.nn.functional.all_gather`, functional
collectives) reduce-scatter in backward instead, which multiplies these gradients by the TP size.

All work on gloo (CPU) and NCCL; tensors gathered must have the same shape on every rank (pad first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce (sum) over the TP group. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather and concatenate along `dim` in rank order. Backward: keep this rank's slice."""

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


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward: enter a region whose ranks each hold part of a computation."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: leave such a region by summing the partial results."""
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather forward along `dim`, own-slice backward (the D-CHAG gather)."""
    return _GatherFromTP.apply(x, group, dim)
