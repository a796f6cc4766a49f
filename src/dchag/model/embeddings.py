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
    """[grid_h * grid_w, dim], rows then columns, half the width each. Each 1-D table is computed once per
    row and per column and broadcast (a 0.25 deg grid has 64,800 patches: no per-patch sines)."""
    half = dim // 2
    rows = sincos_1d(half, torch.arange(grid_h))[:, None, :].expand(grid_h, grid_w, half)  # [h, w, D/2]
    cols = sincos_1d(dim - half, torch.arange(grid_w))[None, :, :].expand(grid_h, grid_w, dim - half)
    return torch.cat([rows, cols], dim=-1).reshape(grid_h * grid_w, dim)  # [L, D]
