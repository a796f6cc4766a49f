"""The channel hierarchy: stacked groups equal per-group loops, padding is exact, presets relate as claimed."""

import math

import pytest
import torch
from conftest import randomize_

from dchag.config import LevelConfig
from dchag.model.aggregation import CrossAttentionPool, LinearPool
from dchag.model.hierarchy import ChannelHierarchy, HierarchyLevel


def reference_cross_attention(pool: CrossAttentionPool, g: int, tokens: torch.Tensor) -> torch.Tensor:
    """Plain per-group multi-head attention: tokens [B, n, L, D] -> [B, k, L, D]."""
    b, n, l, d = tokens.shape
    heads, e = pool.heads, pool.head_dim
    q = (pool.query[g] @ pool.wq[g].T).view(-1, heads, e)  # [k, H, e]
    keys = (tokens @ pool.wk[g].T).view(b, n, l, heads, e)
    vals = (tokens @ pool.wv[g].T).view(b, n, l, heads, e)
    out = torch.zeros(b, q.shape[0], l, heads, e)
    for h in range(heads):
        s = torch.einsum("ke,bnle->blkn", q[:, h], keys[..., h, :]) / math.sqrt(e)
        out[..., h, :] = torch.einsum("blkn,bnle->bkle", s.softmax(-1), vals[..., h, :])
    return out.reshape(b, -1, l, d) @ pool.proj_weight[g].T + pool.proj_bias[g]


@pytest.mark.parametrize("sizes", [[3, 3, 3], [4, 3, 3], [1, 2]])
def test_cross_attention_level_equals_per_group_attention(sizes, rng):
    level = randomize_(HierarchyLevel("cross_attention", sizes, tokens=2, dim=16, heads=4))
    tokens = torch.randn(2, sum(sizes), 5, 16, generator=rng)
    out = level(tokens)  # [B, G*k, L, D]
    start = 0
    for g, size in enumerate(sizes):
        expected = reference_cross_attention(level.aggregator, g, tokens[:, start : start + size])
        torch.testing.assert_close(out[:, 2 * g : 2 * g + 2], expected, rtol=1e-5, atol=1e-6)
        start += size


@pytest.mark.parametrize("sizes", [[4, 4], [3, 2, 2]])
def test_linear_kind_equals_explicit_weighted_sum(sizes, rng):
    level = randomize_(HierarchyLevel("linear", sizes, tokens=1, dim=8, heads=1))
    tokens = torch.randn(2, sum(sizes), 5, 8, generator=rng)
    out = level(tokens)
    start = 0
    for g, size in enumerate(sizes):
        w, b = level.aggregator.weight[g, 0, :size], level.aggregator.bias[g, 0]
        expected = sum(w[c] * tokens[:, start + c] for c in range(size)) + b
        torch.testing.assert_close(out[:, g], expected, rtol=1e-5, atol=1e-6)
        start += size


def test_linear_kind_starts_as_group_mean():
    pool = LinearPool(groups=2, tokens=1, sizes=[3, 2])
    assert torch.allclose(pool.weight[0, 0], torch.tensor([1 / 3] * 3))
    assert torch.allclose(pool.weight[1, 0, :2], torch.tensor([0.5, 0.5]))


def test_padding_slots_get_no_gradient_and_change_nothing(rng):
    level = randomize_(HierarchyLevel("linear", [3, 2], tokens=1, dim=4, heads=1))
    level(torch.randn(1, 5, 2, 4, generator=rng)).sum().backward()
    assert level.aggregator.weight.grad[1, 0, 2] == 0


def identity_(pool: CrossAttentionPool) -> None:
    """Make a cross-attention level over ONE token the identity (softmax over one key is 1)."""
    with torch.no_grad():
        pool.wv.copy_(torch.eye(pool.wv.shape[-1]))
        pool.proj_weight.copy_(torch.eye(pool.wv.shape[-1]))
        pool.proj_bias.zero_()


def test_one_group_hierarchy_equals_the_flat_model(rng):
    """dchag-C with one level-1 group is the flat model plus a level over a single token; when that
    level is the identity the two give identical outputs and gradients."""
    flat = ChannelHierarchy([LevelConfig("cross_attention", groups=1)], 10, 16, 4)
    tree = ChannelHierarchy(
        [LevelConfig("cross_attention", groups=1), LevelConfig("cross_attention", groups=1)], 10, 16, 4
    )
    randomize_(flat)
    tree.levels[0].load_state_dict(flat.levels[0].state_dict())
    identity_(tree.levels[1].aggregator)
    tokens = torch.randn(2, 10, 6, 16, generator=rng, requires_grad=True)
    a, b = flat(tokens), tree(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(a.square().sum(), tokens)
    (gb,) = torch.autograd.grad(b.square().sum(), tokens)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_singleton_linear_groups_reduce_dchag_L_to_flat(rng):
    """dchag-L with one channel per group and unit weights passes every token through unchanged."""
    flat = randomize_(ChannelHierarchy([LevelConfig("cross_attention", groups=1)], 6, 16, 4))
    deep = ChannelHierarchy([LevelConfig("linear", groups=6), LevelConfig("cross_attention", groups=1)], 6, 16, 4)
    deep.levels[1].load_state_dict(flat.levels[0].state_dict())
    assert torch.all(deep.levels[0].aggregator.weight == 1.0)
    tokens = torch.randn(2, 6, 3, 16, generator=rng)
    torch.testing.assert_close(deep(tokens), flat(tokens))


def test_three_level_tree_shapes():
    tree = ChannelHierarchy(
        [
            LevelConfig("cross_attention", group_size=4),
            LevelConfig("linear", groups=2, tokens=2),
            LevelConfig("cross_attention", groups=1),
        ],
        num_channels=14,
        dim=8,
        heads=2,
    )
    assert [lv.sizes for lv in tree.levels] == [[4, 4, 3, 3], [2, 2], [4]]
    assert tree(torch.randn(1, 14, 3, 8)).shape == (1, 3, 8)


def test_qk_norm_builds_and_runs(rng):
    level = HierarchyLevel("cross_attention", [5, 5], tokens=1, dim=16, heads=4, qk_norm=True)
    assert level(torch.randn(1, 10, 3, 16, generator=rng)).shape == (1, 2, 3, 16)
