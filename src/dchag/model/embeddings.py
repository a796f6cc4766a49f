"""Fixed sin-cos tables used to initialise learnable embeddings (channels: 1-D, patches: 2-D)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] (sin | cos halves; an odd last column stays zero)."""
    half = dim // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1)))
    angles = positions.to(torch.float64)[:, None] * freq[None, :]  # [N, half]
    out = torch.zeros(len(positions), dim, dtype=torch.float64)
    out[:, :half] = torch.sin(angles)
    out[:, half : 2 * half] = torch.cos(angles)
    return out.float()


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, dim], rows then columns, half the width each."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    half = dim // 2
    emb = torch.cat([sincos_1d(half, ys.flatten()), sincos_1d(dim - half, xs.flatten())], dim=1)
    return emb  # [L, D]
