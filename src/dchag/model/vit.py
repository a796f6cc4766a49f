"""Pre-LN ViT blocks on scaled_dot_product_attention.

q, k, v are separate linears and heads are inferred with `-1` in the reshapes, so tensor parallelism
(column-parallel q/k/v and fc1, row-parallel proj and fc2) applies from outside without changes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, streams: tuple[int, int]) -> torch.Tensor:
    """Scaled dot-product attention [B, H, L, e] with attention dropout drawn per block of heads.

    `streams = (first, n)`: the H heads form n equal blocks; block i draws its dropout masks from random
    stream `first + i`, seeded from one draw of the global generator. The global generator therefore
    advances the same way whatever the blocks are (activations outside attention keep identical masks
    on every rank that holds the same data, and activation checkpointing replays the draw), while
    heads in different blocks never share masks. One device: (0, 1). Under tensor parallelism rank r
    holds block r of T and uses (r, 1); the single-device model with (0, T) draws exactly the masks of
    a T-way layout.
    """
    if dropout == 0.0:
        return F.scaled_dot_product_attention(q, k, v)
    first, n = streams
    base = int(torch.randint(0, 2**62, (1,)))  # the global (CPU) generator: in step on every TP rank
    # cpu: the default generator is the device's own; meta (dchag info, construction): no data, no RNG
    # state, so nothing to seed - the same per-block ops still run, for shapes and FLOPs
    devices = [q.device] if q.device.type not in ("cpu", "meta") else []
    outs = []
    for i, (qi, ki, vi) in enumerate(zip(q.chunk(n, dim=1), k.chunk(n, dim=1), v.chunk(n, dim=1))):
        with torch.random.fork_rng(devices=devices, device_type=q.device.type):
            torch.random.default_generator.manual_seed(base + first + i)
            if devices:
                torch.get_device_module(q.device.type).manual_seed(base + first + i)  # this device only
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout))
    return outs[0] if n == 1 else torch.cat(outs, dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.head_dim = dim // heads
        self.dropout = dropout
        self.dropout_streams = (0, 1)  # see `attend`; set by tensor parallelism, never by a config
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        q, k, v = (rearrange(w(x), "b l (h e) -> b h l e", e=self.head_dim) for w in (self.wq, self.wk, self.wv))
        out = attend(q, k, v, self.dropout if self.training else 0.0, self.dropout_streams)  # [B, H, L, e]
        return self.proj(rearrange(out, "b h l e -> b l (h e)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))
