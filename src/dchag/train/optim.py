"""AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from dchag.model.parts import part_of

NO_DECAY_NAMES = ("pos_embed", "channel_embed", "query", "mask_token")


def build_optimizer(model: torch.nn.Module, train_cfg, foreach: bool | None = None) -> torch.optim.AdamW:
    """`foreach`: None lets torch choose (multi-tensor kernels on GPUs, one tensor at a time on CPU).
    Frozen parameters (train.freeze: requires_grad off) are left out; each group records the learning-rate
    multiplier `lr_scale` of its model part (train.lr_scale), which `set_lr` applies."""
    scales = dict(getattr(train_cfg, "lr_scale", None) or {})
    groups: dict[tuple[bool, bool, float], list] = {}  # (decayed, DTensor, lr scale) -> parameters
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES) or name.endswith("bias")
        scale = float(scales.get(part_of(name), 1.0))
        groups.setdefault((not skip, isinstance(param, DTensor), scale), []).append(param)
    # DTensors and plain tensors in separate groups: AdamW's multi-tensor kernels (torch's default on
    # GPUs) refuse a list that mixes them, as a tensor-parallel model without FSDP has
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": train_cfg.weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, _, scale), params in sorted(groups.items(), key=lambda kv: kv[0][:2], reverse=True)
        ],
        lr=train_cfg.lr,
        betas=(0.9, 0.95),
        foreach=foreach,
    )


def lr_at(step: int, train_cfg) -> float:
    """Learning rate for 0-based `step`: linear warm-up to lr, cosine down to min_lr at the last step."""
    if train_cfg.warmup_steps > 0 and step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    span = max(1, train_cfg.steps - 1 - train_cfg.warmup_steps)  # the last step (steps - 1) has progress 1
    progress = min(1.0, (step - train_cfg.warmup_steps) / span)
    return train_cfg.min_lr + 0.5 * (train_cfg.lr - train_cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled `lr`, times each group's part multiplier (train.lr_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
