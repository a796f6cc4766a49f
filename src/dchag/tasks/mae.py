"""Masked-autoencoder reconstruction loss."""

from __future__ import annotations

import torch
from einops import rearrange


def mae_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch: int, loss_on: str = "all") -> torch.Tensor:
    """pred, x [B, C, H, W]; mask [B, L] (1 = masked).

    "all": mean squared error over the whole image (as in the paper); "masked": over masked patches only.
    """
    err = (pred.float() - x.float()) ** 2
    if loss_on == "all":
        return err.mean()
    per_patch = rearrange(err, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch, p2=patch).mean(-1)  # [B, L]
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)
