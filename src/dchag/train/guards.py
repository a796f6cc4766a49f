"""Failure checks that every rank decides together.

A check that raises on one rank while its peers wait in a collective hangs the job until the process
group times out. So each rank only *finds* (non-finite input channels, a non-finite loss or gradient
norm) into a small tensor, and one all-reduce (MAX) over all ranks turns the findings into one decision
that every rank takes in the same step. Only when something is wrong does a second, slower collective
gather each rank's description, so the message names the rank and the channel or parameter.

Bad data (a non-finite input or target) stops training at once: no later step would be better. A
non-finite loss or gradient with finite data is usually a transient (one bad batch at a high learning
rate): the step is skipped on every rank alike, and the loop stops only after `train.max_bad_steps`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# slots of the findings vector
INPUT, TARGET, LOSS, GRAD = 0, 1, 2, 3


class TrainingFailure(FloatingPointError):
    """Raised on every rank, with the same message, when any rank finds non-finite values."""


def first_bad_channel(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] -> 0-d int64 tensor: 1 + the index of the first channel holding NaN/Inf, else 0."""
    bad = (~torch.isfinite(x)).any(dim=(0, 2, 3))  # [C]
    order = torch.arange(bad.numel(), 0, -1, device=x.device)  # C .. 1: the first bad channel scores highest
    score = (order * bad).max()
    return torch.where(score > 0, bad.numel() - score + 1, torch.zeros_like(score))


def findings(batch: dict, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """This rank's findings [4] (int64, on the loss's device): 1 + the first bad input channel (or 0),
    and whether the target/lead time, the loss and the gradient norm hold non-finite values. No host
    synchronisation. Pixels that a validity mask (`x_valid`, `y_valid`: data.nan=mask) marks invalid
    are not findings: they are outside the loss."""
    device = loss.device
    batch = {**batch, **{k: _masked(batch[k], batch[f"{k}_valid"]) for k in ("x", "y") if f"{k}_valid" in batch}}
    targets = [batch[k] for k in ("y", "lead_hours") if k in batch and torch.is_floating_point(batch[k])]
    bad_target = torch.stack([~torch.isfinite(t).all() for t in targets]).any() if targets else torch.tensor(False)
    return torch.stack(
        [
            first_bad_channel(batch["x"]).to(device),
            bad_target.long().to(device),
            (~torch.isfinite(loss.detach())).long(),
            (~torch.isfinite(grad_norm)).long().to(device),
        ]
    )


def _masked(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`values` with the pixels `valid` marks invalid set to 0 (a masked NaN is no finding)."""
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _describe(found: list[int], rank: int, channels: list[str], bad_params: list[str]) -> str:
    parts = []
    if found[INPUT]:
        c = found[INPUT] - 1
        parts.append(f"input channel {channels[c] if c < len(channels) else c!r} holds NaN/Inf")
    if found[TARGET]:
        parts.append("the forecast target or lead time holds NaN/Inf")
    if found[LOSS]:
        parts.append("the loss is not finite")
    if found[GRAD]:
        if bad_params:
            more = f" (+{len(bad_params) - 3} more)" if len(bad_params) > 3 else ""
            parts.append(f"non-finite gradients in {', '.join(bad_params[:3])}{more}")
        elif not parts:
            return ""  # the global norm is shared: ranks whose own gradients are finite stay silent
    return f"rank {rank}: " + "; ".join(parts) if parts else ""


def decide(
    local: torch.Tensor, step: int, channels: list[str], model: torch.nn.Module, *, distributed: bool
) -> str | None:
    """None when every rank's step is sound. When any rank found a non-finite loss or gradient (and
    the data are finite), the same message on every rank: skip this step. Bad data raises
    `TrainingFailure` on every rank.

    One all-reduce (MAX) of the 4 findings in the normal case, read by the host: the step's one
    synchronisation point, by design (the decision is needed before the optimizer step)."""
    agreed = local.clone()
    if distributed:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if not bool(agreed.any()):
        return
    found = local.tolist()
    bad_params = []
    if found[GRAD]:
        bad_params = [
            name
            for name, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())
        ]
    rank = dist.get_rank() if distributed else 0
    reports = [_describe(found, rank, channels, bad_params)]
    if distributed:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, _describe(found, rank, channels, bad_params))
    reports = [r for r in reports if r] or ["the gradient norm is not finite"]
    everyone = agreed.tolist()
    data_problem = everyone[INPUT] or everyone[TARGET]
    if not data_problem:
        return f"step {step}: {' | '.join(reports)}"
    raise TrainingFailure(f"step {step}: {' | '.join(reports)}; stopping all ranks (fix or mask the data source)")


class BadSteps:
    """Counts skipped steps; raises `TrainingFailure` (every rank alike) once more than `limit` were."""

    def __init__(self, limit: int):
        self.limit, self.count, self.last = limit, 0, ""

    def record(self, message: str) -> None:
        self.count += 1
        self.last = message
        if self.count > self.limit:
            raise TrainingFailure(
                f"{message}; {self.count} steps had a non-finite loss or gradient, more than "
                f"train.max_bad_steps={self.limit}: stopping all ranks (lower train.lr or enable train.grad_clip)"
            )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
