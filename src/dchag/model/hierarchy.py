"""The channel hierarchy: C channel tokens per patch are reduced, level by level, to one token.

Level i receives M_i tokens per patch, splits them into G_i contiguous groups (near-equal sizes, the
first ones one larger when M_i % G_i != 0) and reduces each group to k_i tokens, so
M_{i+1} = G_i * k_i; the last level gives one token. Uneven groups are padded to the largest size and
masked, so all groups of a level still run as one stacked op.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dchag.config import LevelConfig
from dchag.model.aggregation import CrossAttentionPool, LinearPool
from dchag.model.groups import resolve_level_groups, split_sizes


def group_layout(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For contiguous groups of the given sizes: gather index [G, n_max] into the M tokens (padding
    points at slot M, a zero token) and the validity mask [G, n_max], or (index, None) when even."""
    n_max = max(sizes)
    total = sum(sizes)
    index = torch.full((len(sizes), n_max), total, dtype=torch.long)
    valid = torch.zeros(len(sizes), n_max, dtype=torch.bool)
    start = 0
    for g, size in enumerate(sizes):
        index[g, :size] = torch.arange(start, start + size)
        valid[g, :size] = True
        start += size
    return index, (None if len(set(sizes)) == 1 else valid)


class HierarchyLevel(nn.Module):
    """Groups this level's input tokens and reduces every group with one stacked aggregator."""

    def __init__(self, kind: str, sizes: list[int], tokens: int, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.kind, self.sizes, self.tokens = kind, list(sizes), tokens
        index, valid = group_layout(self.sizes)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        if kind == "cross_attention":
            self.aggregator = CrossAttentionPool(len(sizes), tokens, dim, heads, qk_norm)
        elif kind == "linear":
            self.aggregator = LinearPool(len(sizes), tokens, self.sizes)
        else:
            raise ValueError(f"aggregator kind {kind!r} is unknown; use 'cross_attention' or 'linear'")

    @property
    def groups(self) -> int:
        return len(self.sizes)

    def subset(self, g0: int, g1: int) -> "HierarchyLevel":
        """A level holding only groups [g0, g1) of this one, with those groups' parameters copied."""
        agg = self.aggregator
        if self.kind == "cross_attention":
            dim, heads, qk_norm = agg.wq.shape[-1], agg.heads, agg.q_norm is not None
        else:
            dim, heads, qk_norm = 1, 1, False
        sub = HierarchyLevel(self.kind, self.sizes[g0:g1], self.tokens, dim, heads, qk_norm)
        state = {k: (v[g0:g1] if k in agg.group_params else v) for k, v in agg.state_dict().items()}
        if self.kind == "linear":  # padding width follows the largest group kept
            state["weight"] = state["weight"][..., : max(sub.sizes)]
        # assign copies (on the meta device while a rank builds its shards: no data to copy yet)
        sub.aggregator.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        device = next(agg.parameters()).device
        return sub if device.type == "meta" else sub.to(device)  # buffers keep their values on meta builds

    def group(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, M, L, D] -> [B, G, n, L, D]; a free reshape when the groups are even."""
        if self.valid is None:
            return rearrange(tokens, "b (g n) l d -> b g n l d", g=self.groups)
        pad = tokens.new_zeros(tokens.shape[0], 1, *tokens.shape[2:])
        return torch.cat([tokens, pad], dim=1)[:, self.index]

    def pad_channels(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Channels along `dim` in group order, uneven groups zero-padded: C -> G*n (no copy when even)."""
        if self.valid is None:
            return t
        pad = t.new_zeros(*t.shape[:dim], 1, *t.shape[dim + 1 :])
        return torch.cat([t, pad], dim=dim).index_select(dim, self.index.flatten())

    def forward_fused(self, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """First level straight from pixels: image x [B, C, H, W], per-channel tokenizer weight
        [C, D, p, p] and shift [C, D] -> [B, G*k, L, D], equal to forward(tokens) without the tokens."""
        out = self.aggregator.forward_fused(
            self.pad_channels(x, 1), self.pad_channels(weight, 0), self.pad_channels(shift, 0), self.valid
        )  # [B, G, k, L, D]
        return rearrange(out, "b g k l d -> b (g k) l d")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, M, L, D] -> [B, G*k, L, D]."""
        out = self.aggregator(self.group(tokens), self.valid)  # [B, G, k, L, D]
        return rearrange(out, "b g k l d -> b (g k) l d")


class ChannelHierarchy(nn.Module):
    """The levels of the hierarchy, applied in order: [B, C, L, D] -> [B, L, D]."""

    def __init__(self, levels: list[LevelConfig], num_channels: int, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        shapes = resolve_level_groups(levels, num_channels)
        self.levels = nn.ModuleList(
            HierarchyLevel(spec.kind, split_sizes(tokens_in, groups), spec.tokens, dim, heads, qk_norm)
            for spec, (tokens_in, groups) in zip(levels, shapes)
        )

    def forward(self, tokens: torch.Tensor, start_level: int = 0) -> torch.Tensor:
        for level in self.levels[start_level:]:
            tokens = level(tokens)
        return rearrange(tokens, "b 1 l d -> b l d")
