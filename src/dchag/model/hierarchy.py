"""The channel hierarchy: C channel tokens per patch are reduced, level by level, to one token.

Level i receives M_i tokens per patch, splits them into G_i contiguous groups (near-equal sizes, the
first ones one larger when M_i % G_i != 0) and reduces each group to k_i tokens, so
M_{i+1} = G_i * k_i; the last level gives one token. Uneven groups are padded to the largest size and
masked, so all groups of a level still run as one stacked op.

Any band subset (`train.channel_subset`, evaluation on some of the channels): a keep mask [C] marks the
dropped channels invalid exactly as padding is. Validity then flows level by level: a group with no valid
member gives tokens that are invalid for the next level (computed on a harmless stand-in, so no softmax
over nothing gives NaN), and the last level has a valid input whenever one channel is kept.
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


def members_valid(index: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor:
    """Validity [M] of a level's input tokens -> [G, n_max] of each group's member slots (padding False)."""
    return torch.cat([token_valid, token_valid.new_zeros(1)])[index]


def groups_valid(index: torch.Tensor, token_valid: torch.Tensor, tokens: int) -> torch.Tensor:
    """Validity [M] of a level's input tokens -> [G*k] of its output tokens: a group with no valid member
    gives invalid tokens."""
    return members_valid(index, token_valid).any(dim=-1).repeat_interleave(tokens)


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

    def attend_mask(self, token_valid: torch.Tensor | None) -> torch.Tensor | None:
        """The [G, n] mask the aggregator applies: padding, plus the invalid tokens of `token_valid` [M]
        (None: every token valid). A cross-attention group left with no valid member attends over its
        padding-free slots instead (finite; `output_valid` marks its tokens invalid, so nothing reads
        them); a linear group needs no stand-in (it gives its bias)."""
        if token_valid is None:
            return self.valid
        members = members_valid(self.index, token_valid)  # [G, n]
        if self.kind != "cross_attention":
            return members
        fallback = self.valid if self.valid is not None else torch.ones_like(members)
        return torch.where(members.any(dim=-1, keepdim=True), members, fallback)

    def output_valid(self, token_valid: torch.Tensor | None) -> torch.Tensor | None:
        """Validity [G*k] of this level's output tokens given that of its inputs [M] (None: all valid)."""
        return None if token_valid is None else groups_valid(self.index, token_valid, self.tokens)

    def forward_fused(
        self, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, channel_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """First level straight from pixels: image x [B, C, H, W], per-channel tokenizer weight
        [C, D, p, p] and shift [C, D] -> [B, G*k, L, D], equal to forward(tokens) without the tokens.
        `channel_keep` [C]: channels to leave out (False); their pixels must already be zero."""
        out = self.aggregator.forward_fused(
            self.pad_channels(x, 1),
            self.pad_channels(weight, 0),
            self.pad_channels(shift, 0),
            self.attend_mask(channel_keep),
        )  # [B, G, k, L, D]
        return rearrange(out, "b g k l d -> b (g k) l d")

    def forward(self, tokens: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, M, L, D] -> [B, G*k, L, D]; `token_valid` [M]: tokens to leave out (False)."""
        out = self.aggregator(self.group(tokens), self.attend_mask(token_valid))  # [B, G, k, L, D]
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

    def forward(
        self, tokens: torch.Tensor, start_level: int = 0, token_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`token_valid` [M]: which input tokens of level `start_level` are valid (None: all)."""
        for level in self.levels[start_level:]:
            tokens, token_valid = level(tokens, token_valid), level.output_valid(token_valid)
        return rearrange(tokens, "b 1 l d -> b l d")
