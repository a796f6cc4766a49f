"""The fused front end: tokenize-and-aggregate without materializing per-channel tokens.

Tokenization is affine in the pixels (tok_c = E_c p_c + s_c, patch p_c, weight E_c [D, p, p], shift
s_c = bias + channel embedding), key/value projections are linear, and the aggregators' queries are
learned parameters. So, exactly:

- linear kind:  sum_c w_c tok_c + b = sum_c (w_c E_c) p_c + (sum_c w_c s_c + b): one strided, grouped
  convolution of the image with a weight composed on the fly.
- cross-attention kind, head h: score_c = (q_h^T Wk_h E_c) p_c + q_h^T Wk_h s_c, a per-channel strided
  convolution; out_h = sum_c a_c (Wv_h E_c) p_c + sum_c a_c Wv_h s_c, i.e. a strided convolution of the
  image weighted pixel-wise by the attention, with the filter Wv_h E_c composed once per step. The
  weighted image (the size of the input) exists for one head at a time inside
  `attention_weighted_conv`, which recomputes it in backward.

Neither path holds a [B, C, L, D] tensor, per-channel keys/values or even a patch-layout copy of the
input: every large tensor is the input itself or a transient of its size. Not exact with a norm on keys
(keys are then not linear in the pixels): the model falls back to the reference path there.

Shapes: x [B, G*n, H, W] (channels in group order, uneven groups zero-padded to n), E [G*n, D, p, p],
S [G*n, D], valid [G, n] (False = padding) or None; L = (H/p)(W/p) patches in row-major order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.grad import conv2d_input, conv2d_weight


def compute_dtype(device_type: str, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype a custom autograd function computes in: autocast's where autocast is on (its backward
    runs outside autocast, so the choice must be made and remembered in forward), else the promoted type."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _upsample(a: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, h, w] per-patch values -> [B, C, h*p, w*p] constant over each patch."""
    return a.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def _patch_sum(t: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, h*p, w*p] -> [B, C, h, w], the sum over each patch."""
    b, c, hh, ww = t.shape
    return t.view(b, c, hh // patch, patch, ww // patch, patch).sum(dim=(3, 5))


class _AttentionWeightedConv(torch.autograd.Function):
    """out[b,g,l,h,j,:] = conv_p(x * a[:, :, :, h, j], filters ve[g, h]) for every head h and token j.

    attn [B, G, L, H, k, n], x [B, G*n, H_img, W_img], ve [G, H, e, n, p, p] -> [B, G, L, H, k, e].
    One (head, token) at a time: the weighted image exists once, and backward recomputes it.
    """

    @staticmethod
    def forward(ctx, attn, x, ve, patch, grid_w):
        # Under autocast the inputs arrive in mixed dtypes and backward runs outside autocast: compute
        # both passes in one explicit dtype (the autocast dtype, else the inputs' common type) and hand
        # every gradient back in its input's dtype.
        ctx.in_dtypes = (attn.dtype, x.dtype, ve.dtype)
        dtype = compute_dtype(x.device.type, attn, x, ve)
        attn, x, ve = attn.to(dtype), x.to(dtype), ve.to(dtype)
        b, g, l, heads, tokens, n = attn.shape
        e = ve.shape[2]
        out = attn.new_empty(b, g, l, heads, tokens, e)
        for h in range(heads):
            filters = ve[:, h].reshape(g * e, n, patch, patch)
            for j in range(tokens):
                a = rearrange(attn[:, :, :, h, j, :], "b g (y x) c -> b (g c) y x", x=grid_w)
                o = F.conv2d(x * _upsample(a, patch), filters, stride=patch, groups=g)  # [B, G*e, h, w]
                out[:, :, :, h, j, :] = rearrange(o, "b (g e) y x -> b g (y x) e", g=g)
        ctx.save_for_backward(attn, x, ve)
        ctx.patch, ctx.grid_w = patch, grid_w
        return out

    @staticmethod
    def backward(ctx, grad):
        attn, x, ve = ctx.saved_tensors
        patch, grid_w = ctx.patch, ctx.grid_w
        grad = grad.to(x.dtype)
        b, g, l, heads, tokens, n = attn.shape
        e = ve.shape[2]
        need_attn, need_x, need_ve = ctx.needs_input_grad[:3]
        d_attn = torch.zeros_like(attn) if need_attn else None
        d_x = torch.zeros_like(x) if need_x else None
        d_ve = torch.zeros_like(ve) if need_ve else None
        for h in range(heads):
            filters = ve[:, h].reshape(g * e, n, patch, patch)
            for j in range(tokens):
                a_up = _upsample(rearrange(attn[:, :, :, h, j, :], "b g (y x) c -> b (g c) y x", x=grid_w), patch)
                g_out = rearrange(grad[:, :, :, h, j, :], "b g (y x) e -> b (g e) y x", x=grid_w).contiguous()
                if need_attn or need_x:
                    g_weighted = conv2d_input(x.shape, filters, g_out, stride=patch, groups=g)  # [B, G*n, H, W]
                    if need_attn:
                        d_a = _patch_sum(g_weighted * x, patch)  # [B, G*n, h, w]
                        d_attn[:, :, :, h, j, :] = rearrange(d_a, "b (g c) y x -> b g (y x) c", g=g)
                    if need_x:
                        d_x += g_weighted * a_up
                if need_ve:
                    d_filters = conv2d_weight(x * a_up, filters.shape, g_out, stride=patch, groups=g)
                    d_ve[:, h] += d_filters.view(g, e, n, patch, patch)
        d_attn, d_x, d_ve = (d if d is None else d.to(t) for d, t in zip((d_attn, d_x, d_ve), ctx.in_dtypes))
        return d_attn, d_x, d_ve, None, None


def attention_weighted_conv(
    attn: torch.Tensor, x: torch.Tensor, ve: torch.Tensor, patch: int, grid_w: int
) -> torch.Tensor:
    """attn [B, G, L, H, k, n], x [B, G*n, H, W], ve [G, H, e, n, p, p] -> [B, G, L, H, k, e]."""
    return _AttentionWeightedConv.apply(attn, x, ve, patch, grid_w)


def fused_linear_pool(pool, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, valid) -> torch.Tensor:
    """LinearPool applied to tokens it never sees: -> [B, G, k, L, D]."""
    g, k, n = pool.weight.shape
    d, patch = weight.shape[1], weight.shape[-1]
    w = pool.effective_weight(valid)  # [G, k, n]
    composed = torch.einsum("gjc,gcdpq->gjdcpq", w, weight.view(g, n, d, patch, patch))  # parameter-sized
    out = F.conv2d(x, composed.reshape(g * k * d, n, patch, patch), stride=patch, groups=g)  # [B, G*k*D, h, w]
    out = rearrange(out, "b (g j d) y x -> b g j (y x) d", g=g, j=k)
    offset = torch.einsum("gjc,gcd->gjd", w, shift.view(g, n, d)) + pool.bias[..., None]  # [G, k, D]
    return out + offset[None, :, :, None, :]


def fused_cross_attention_pool(pool, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, valid) -> torch.Tensor:
    """CrossAttentionPool applied to tokens it never sees: -> [B, G, k, L, D]."""
    g, k = pool.query.shape[:2]
    e, heads = pool.head_dim, pool.heads
    d, patch = weight.shape[1], weight.shape[-1]
    n = x.shape[1] // g
    grid_w = x.shape[-1] // patch
    E, S = weight.view(g, n, d, patch, patch), shift.view(g, n, d)
    q = pool.project_query()  # [G, k, H, e]
    q_keys = torch.einsum("gjhe,ghed->gjhd", q, pool.wk.view(g, heads, e, -1)) * e**-0.5  # query through Wk
    score_filters = torch.einsum("gjhd,gcdpq->gcjhpq", q_keys, E)  # [G, n, k, H, p, p]
    score_bias = torch.einsum("gjhd,gcd->ghjc", q_keys, S)  # [G, H, k, n]
    scores = F.conv2d(x, score_filters.reshape(g * n * k * heads, 1, patch, patch), stride=patch, groups=g * n)
    scores = rearrange(scores, "b (g c j h) y x -> b g (y x) h j c", g=g, c=n, j=k) + score_bias[None, :, None]
    if valid is not None:
        scores = scores.masked_fill(~valid[None, :, None, None, None, :], float("-inf"))
    attn = scores.softmax(dim=-1)  # [B, G, L, H, k, n]
    wv = pool.wv.view(g, heads, e, -1)
    ve = torch.einsum("ghed,gcdpq->ghecpq", wv, E)  # [G, H, e, n, p, p]: Wv_h E_c
    vs = torch.einsum("ghed,gcd->ghec", wv, S)  # [G, H, e, n]: Wv_h s_c
    heads_out = attention_weighted_conv(attn, x, ve, patch, grid_w) + torch.einsum("bglhjc,ghec->bglhje", attn, vs)
    return pool.finish(rearrange(heads_out, "b g l h j e -> b g j l h e"))
