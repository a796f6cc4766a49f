"""Pre-LN ViT blocks on scaled_dot_product_attention.

q, k, v are separate linears and heads are inferred with `-1` in the reshapes, so tensor parallelism
(column-parallel q/k/v and fc1, row-parallel proj and fc2) applies from outside without changes here;
context parallelism sets `Attention.kv_exchange` (attention over the whole sequence's keys and values)
and the dropout strips, also from outside.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

STRIP_STRIDE = 1 << 20  # random streams of query strip s start at s * STRIP_STRIDE (more than any head count)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Inside, the random state is forked and seeded (this device's too): draws depend on `seed` alone.
    cpu: the default generator is the device's own; meta (dchag info, construction): no data, no RNG
    state, so nothing to seed - the same ops still run, for shapes and FLOPs."""
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.get_device_module(device.type).manual_seed(seed)  # this device only
        yield


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout: float,
    streams: tuple[int, int],
    strips: tuple[int, tuple[int, ...]] | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention [B, H, L, e] with attention dropout drawn per block of heads.

    `streams = (first, n)`: the H heads form n equal blocks; block i draws its dropout masks from random
    stream `first + i`, seeded from one draw of the global generator. The global generator therefore
    advances the same way whatever the blocks are (activations outside attention keep identical masks
    on every rank that holds the same data, and activation checkpointing replays the draw), while
    heads in different blocks never share masks. One device: (0, 1). Under tensor parallelism rank r
    holds block r of T and uses (r, 1); the single-device model with (0, T) draws exactly the masks of
    a T-way layout.

    `strips = (first, sizes)`: the queries form strips of `sizes` tokens, strip s drawing from streams
    offset by (first + s) * STRIP_STRIDE. Under context parallelism CP rank j holds strip j's queries and
    every key, and uses (j, (L_j,)); the single-device model with (0, (L_0, ..., L_{cp-1})) draws exactly
    the masks of that layout. None: one strip (the queries whole).
    """
    if dropout == 0.0:
        return F.scaled_dot_product_attention(q, k, v)
    first, n = streams
    strip0, sizes = strips if strips is not None else (0, (q.shape[2],))
    base = int(torch.randint(0, 2**62, (1,)))  # the global (CPU) generator: in step on every TP/CP rank
    outs = []
    for i, (qi, ki, vi) in enumerate(zip(q.chunk(n, dim=1), k.chunk(n, dim=1), v.chunk(n, dim=1))):
        rows = []
        for s, qs in enumerate(qi.split(list(sizes), dim=2)):
            with _seeded(q.device, base + first + i + STRIP_STRIDE * (strip0 + s)):
                rows.append(F.scaled_dot_product_attention(qs, ki, vi, dropout_p=dropout))
        outs.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=2))
    return outs[0] if n == 1 else torch.cat(outs, dim=1)


class StripDropout(nn.Dropout):
    """nn.Dropout on a token sequence [B, L, D]; with `strips = (first, sizes)` (set by context
    parallelism, never by a config) the tokens form strips of `sizes`, strip s drawing its mask from
    random stream first + s, seeded from one draw of the global generator: a CP rank uses (j, (L_j,)),
    and the single-device model with (0, (L_0, ..., L_{cp-1})) draws exactly the masks of that layout.
    None (one device): plain nn.Dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__(p)
        self.strips: tuple[int, tuple[int, ...]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strips is None or not self.training or self.p == 0.0:
            return super().forward(x)
        first, sizes = self.strips
        base = int(torch.randint(0, 2**62, (1,)))
        parts = []
        for s, part in enumerate(x.split(list(sizes), dim=1)):
            with _seeded(x.device, base + first + s):
                parts.append(F.dropout(part, self.p, True))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.head_dim = dim // heads
        self.dropout = dropout
        self.dropout_streams = (0, 1)  # see `attend`; set by tensor parallelism, never by a config
        self.dropout_strips = None  # see `attend`; set by context parallelism, never by a config
        # context parallelism sets a function that attends this rank's queries to the whole sequence's
        # keys and values, from this rank's strip of both (`attend`'s arguments; dchag.parallel.context_parallel)
        self.kv_exchange = None
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        q, k, v = (rearrange(w(x), "b l (h e) -> b h l e", e=self.head_dim) for w in (self.wq, self.wk, self.wv))
        drop = self.dropout if self.training else 0.0
        if self.kv_exchange is None:
            out = attend(q, k, v, drop, self.dropout_streams, self.dropout_strips)  # [B, H, L, e]
        else:  # this rank's queries attend to every rank's keys
            out = self.kv_exchange(q, k, v, drop, self.dropout_streams, self.dropout_strips)
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
        self.drop = StripDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))
