"""Autoregressive forecasting at the tensor level: each step's predicted channels become the next step's
inputs. One function for training with `train.rollout_steps` (gradients flow through every step) and for
inference (`dchag forecast`, under torch.no_grad).

The model is used as it is: the single-device `ChannelViT` or a rank's tensor-parallel part of it. Under
tensor parallelism a rank's x holds only its own input channels and its model predicts only the output
channels it owns (`ChannelShard.out_index`), every one of which is among its own inputs, so the feedback
stays on the rank: `in_out_index` then gives local input positions (`input_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class RolloutOutput:
    """A rollout's predictions, as `compute_loss` returns them: pred [B, K, C_out, H, W]."""

    pred: torch.Tensor


def input_positions(channels: list[str], out_channels: list[str], channel_shard=None) -> list[int]:
    """`in_out_index` for `rollout`: the position among the model's inputs of each output channel it
    predicts. With a `ChannelShard` (this rank holds inputs channels[start:stop] and predicts the outputs
    `out_index`), positions are among this rank's inputs."""
    if channel_shard is None:
        return [channels.index(c) for c in out_channels]
    local = channels[channel_shard.start : channel_shard.stop]
    return [local.index(out_channels[k]) for k in channel_shard.out_index]


def _step(model, x: torch.Tensor, lead_hours: torch.Tensor, channel_keep=None) -> torch.Tensor:
    if channel_keep is None:
        return model(x, lead_hours).pred
    return model(x, lead_hours, channel_keep=channel_keep).pred


def rollout(
    model, x, lead_hours, steps, *, in_out_index, forcings=None, checkpointing: bool = False, channel_keep=None
) -> list[torch.Tensor]:  # fmt: skip
    """x [B, C, H, W] normalised inputs at t0; lead_hours [B] (one step's lead); `in_out_index[k]` = the input
    channel index fed by output channel k; forcings: optional list (len steps-1) of [B, C, H, W] inputs at each
    later valid time (their non-predicted channels are used; None: non-predicted channels held fixed).
    `checkpointing`: recompute each step's activations in backward (torch.utils.checkpoint), so training
    memory grows by one step's inputs per step instead of one step's activations.
    `channel_keep` [C]: a band subset, the same at every step (left-out inputs stay out, predicted or not).
    Returns the `steps` predictions [B, C_out, H, W] at t0 + lead, t0 + 2 lead, ..."""
    if steps < 1:
        raise ValueError(f"rollout steps={steps} must be >= 1")
    if forcings is not None and len(forcings) < steps - 1:
        raise ValueError(f"rollout of {steps} steps needs {steps - 1} forcing inputs, got {len(forcings)}")
    index = torch.as_tensor(list(in_out_index), dtype=torch.long, device=x.device)  # [C_out]
    preds: list[torch.Tensor] = []
    current = x  # [B, C, H, W]
    for s in range(steps):
        if checkpointing and torch.is_grad_enabled():
            pred = checkpoint(_step, model, current, lead_hours, channel_keep, use_reentrant=False)
        else:
            pred = _step(model, current, lead_hours, channel_keep)  # [B, C_out, H, W]
        preds.append(pred)
        if s + 1 < steps:  # the next inputs: the predicted channels over the data at the next valid time
            base = forcings[s] if forcings is not None else current  # [B, C, H, W]
            current = base.index_copy(1, index, pred.to(base.dtype))
    return preds
