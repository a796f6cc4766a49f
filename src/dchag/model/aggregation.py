"""Channel aggregators, stacked over groups so that every group of a hierarchy level runs in one op.

Both take grouped tokens `[B, G, n, L, D]` (G groups of n channel tokens, L patches, width D) and a
validity mask `[G, n]` (False marks padding in uneven groups), and return `[B, G, k, L, D]`: k tokens
per group and patch. Every parameter whose first dimension is G belongs to one group (listed in
`group_params`), so a group subset can be cut out of a level by slicing those tensors.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dchag.model.fused import fused_cross_attention_pool, fused_linear_pool


class CrossAttentionPool(nn.Module):
    """Multi-head cross-attention from k learned queries per group to the group's channel tokens.

    Per group g and head h: q = query_g Wq_g, keys/values = tokens Wk_g / tokens Wv_g, softmax over the
    group's channels, then an output projection Wo_g with bias. The number of heads in use is read from the
    weight shapes, so a head-sharded copy of this module computes its share of the heads with the same code.

    No q/k/v biases, by design rather than omission: with one learned query per token, a key bias adds
    the same q.b_k to every channel's score (softmax ignores it), a value bias passes through the
    attention unchanged (its weights sum to 1) and folds into the output bias, and a query bias is a
    reparametrisation of the learned query itself. None of them changes what the module can compute.
    """

    group_params = ("query", "wq", "wk", "wv", "proj_weight", "proj_bias")

    def __init__(self, groups: int, tokens: int, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"aggregator heads={heads} does not divide width {dim}")
        self.head_dim = dim // heads
        self.query = nn.Parameter(torch.zeros(groups, tokens, dim))  # zero init: uniform attention at start
        self.wq = nn.Parameter(torch.empty(groups, dim, dim))  # [G, out, in]
        self.wk = nn.Parameter(torch.empty(groups, dim, dim))
        self.wv = nn.Parameter(torch.empty(groups, dim, dim))
        self.proj_weight = nn.Parameter(torch.empty(groups, dim, dim))
        self.proj_bias: nn.Parameter | None = nn.Parameter(torch.zeros(groups, dim))
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.wq.is_meta:
            return  # shapes only: a rank building its shards fills in the values (parallel/construct.py)
        for name, value in self.initial_values(torch.default_generator):
            getattr(self, name).copy_(value)

    def initial_values(self, g: torch.Generator):
        """Zero queries, width-aware projections, zero bias.

        The ViT's fixed N(0, 0.02) shrinks a signal by 0.02 sqrt(D) per matrix (5x at D = 96), and a
        hierarchy chains several (value and output projection at every level), so at small widths D-CHAG-C's
        front end started ~26x weaker than flat's. Query and key projections get std sqrt(0.5 / D), what
        ClimaX's channel aggregation gets (torch's MultiheadAttention: xavier-uniform over its stacked
        [3D, D] in-projection). Value and output projections get std sqrt(1 / D), gain 1: under the
        near-uniform attention these levels keep (docs/benchmarks.md, attention entropy), a level passes
        its tokens' scale on unchanged, so a two-level D-CHAG-C front end starts at flat's scale instead of
        half of it. Measured (tiny-weather, paired seeds): with gain 1/sqrt(2) for these two as well,
        D-CHAG-C ended 3% above flat (benchmarks/results/superseded/accuracy-cpu-gain-half.json)."""
        from dchag.model.init import trunc_normal

        dim = self.wq.shape[-1]
        yield "query", torch.zeros(self.query.shape)
        for name, gain in (("wq", 0.5), ("wk", 0.5), ("wv", 1.0), ("proj_weight", 1.0)):
            yield name, trunc_normal(getattr(self, name).shape, g, std=(gain / dim) ** 0.5)
        if self.proj_bias is not None:
            yield "proj_bias", torch.zeros(self.proj_bias.shape)

    @property
    def heads(self) -> int:
        return self.wq.shape[1] // self.head_dim

    @property
    def fused_unsupported(self) -> str | None:
        """Why the fused path cannot compute this module exactly, or None when it can."""
        return "a norm on keys makes keys non-linear in the pixels" if self.k_norm is not None else None

    def forward_fused(self, patches, weight, shift, valid=None) -> torch.Tensor:
        """Same result as forward(tokenize(patches)) without the tokens; see `dchag.model.fused`."""
        return fused_cross_attention_pool(self, patches, weight, shift, valid)

    def project_query(self) -> torch.Tensor:
        """[G, k, H, e]: the (learned, input-independent) queries, projected and split into heads."""
        q = torch.einsum("gkd,ged->gke", self.query, self.wq)
        q = rearrange(q, "g k (h e) -> g k h e", e=self.head_dim)
        return self.q_norm(q) if self.q_norm is not None else q

    def finish(self, heads_out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs [B, G, k, L, H, e] -> output projection (+ bias) [B, G, k, L, D]."""
        merged = rearrange(heads_out, "b g k l h e -> b g k l (h e)")
        out = torch.einsum("bgkle,gde->bgkld", merged, self.proj_weight)
        if self.proj_bias is not None:
            out = out + self.proj_bias[None, :, None, None, :]
        return out

    def attention(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights [B, G, L, H, k, n] of each query token over its group's n channel tokens
        (padding slots get 0); what `forward` uses, and what the entropy diagnostic reads."""
        q = self.project_query()  # [G, k, H, e]
        keys = rearrange(
            torch.einsum("bgnld,ged->bgnle", tokens, self.wk), "b g n l (h e) -> b g n l h e", e=self.head_dim
        )
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        scores = torch.einsum("gkhe,bgnlhe->bglhkn", q, keys) * self.head_dim**-0.5  # [B, G, L, H, k, n]
        if valid is not None:
            scores = scores.masked_fill(~valid[None, :, None, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attention(tokens, valid)  # [B, G, L, H, k, n]
        values = rearrange(
            torch.einsum("bgnld,ged->bgnle", tokens, self.wv), "b g n l (h e) -> b g n l h e", e=self.head_dim
        )
        heads_out = torch.einsum("bglhkn,bgnlhe->bgklhe", attn, values)  # [B, G, k, L, H, e]
        return self.finish(heads_out)


class LinearPool(nn.Module):
    """k learned weighted sums over each group's channels plus a scalar bias (the paper's "L" kind).

    Weights start at the group mean (1/n), so the untrained level averages its channels. With members left
    out (a band subset) the kept ones are rescaled by n / n_kept, as inverted dropout does: an averaging
    group keeps averaging, and the level's output keeps its scale whatever the subset's size.
    """

    group_params = ("weight", "bias")

    def __init__(self, groups: int, tokens: int, sizes: list[int]):
        super().__init__()
        n_max = max(sizes)
        self.sizes = list(sizes)
        self.weight = nn.Parameter(self._group_means(tokens, n_max))  # [G, k, n]
        self.bias = nn.Parameter(torch.zeros(groups, tokens))  # [G, k]
        self.register_buffer("members", torch.tensor(self.sizes, dtype=torch.float32), persistent=False)  # [G]

    def _group_means(self, tokens: int, n_max: int) -> torch.Tensor:
        weight = torch.zeros(len(self.sizes), tokens, n_max)
        for g, size in enumerate(self.sizes):
            weight[g, :, :size] = 1.0 / size
        return weight

    def initial_values(self, g: torch.Generator):
        """Each group's mean (1/n over its valid members), zero bias; nothing random."""
        yield "weight", self._group_means(self.weight.shape[1], self.weight.shape[2])
        yield "bias", torch.zeros(self.bias.shape)

    def effective_weight(self, valid: torch.Tensor | None) -> torch.Tensor:
        """[G, k, n] with invalid slots (padding, members left out) forced to zero and the valid ones scaled
        by n / n_valid (exactly 1 when only padding is invalid; a group with no valid member gives its bias)."""
        if valid is None:
            return self.weight
        scale = self.members.to(self.weight.dtype) / valid.sum(dim=-1).clamp(min=1)  # [G]
        return self.weight * (valid * scale[:, None])[:, None, :]

    fused_unsupported = None

    def forward_fused(self, patches, weight, shift, valid=None) -> torch.Tensor:
        """Same result as forward(tokenize(patches)) without the tokens; see `dchag.model.fused`."""
        return fused_linear_pool(self, patches, weight, shift, valid)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.einsum("bgnld,gkn->bgkld", tokens, self.effective_weight(valid))
        return out + self.bias[None, :, :, None, None]
