"""Finish the gradients of a channel-parallel model after backward, so they are the single-device ones.

Shared by the whole-model plan (`ParallelPlan.finish_gradients`) and the front end alone
(`dchag.parallelize_front_end`).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dchag.parallel.channel_parallel import ShardSpec


def finish_gradients(
    named_parameters: Iterable[tuple[str, nn.Parameter]], specs: dict[str, ShardSpec], tp_group, tp: int
) -> None:
    """1. A parameter without a gradient gets zeros, as on one device, where every parameter takes part
       (a parameter held by one TP rank only would otherwise skip AdamW's weight decay and drift).
    2. Gradients that each TP rank computed only in part (`ShardSpec.partial_grad`) are summed over the
       TP group, all in one flat all-reduce.
    """
    partial = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        spec = specs.get(name)
        if tp > 1 and spec is not None and spec.partial_grad:
            partial.append(param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad)
    if partial:
        flat = torch.cat([g.reshape(-1) for g in partial])
        dist.all_reduce(flat, group=tp_group)
        torch._foreach_copy_(partial, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in partial]), partial)])
