"""The fused front end: tokenize-and-aggregate without materializing per-channel tokens.

Tokenization is affine in the pixels (tok_c = E_c p_c + s_c, patch p_c, weight E_c [D, p*p], shift
s_c = bias + channel embedding), key/value projections are linear, and the aggregators' queries are
learned parameters. So, exactly:

- linear kind:  sum_c w_c tok_c + b = sum_c (w_c E_c) p_c + (sum_c w_c s_c + b): one patch projection
  with a weight composed on the fly. Activations: the output only.
- cross-attention kind, head h: score_c = (q_h^T Wk_h E_c) p_c + q_h^T Wk_h s_c, an affine function of
  the patch; out_h = sum_c a_c Wv_h (E_c p_c + s_c) = sum_c a_c (Wv_h E_c) p_c + sum_c a_c Wv_h s_c.
  With Wv_h E_c composed once per step, the only per-pixel work is weighting the patches by the
  attention, done one head at a time in `weighted_patch_projection` and recomputed in backward.

Neither path holds a [B, C, L, D] tensor or per-channel keys/values. Not exact with a norm on keys
(keys are then not linear in the pixels): the model falls back to the reference path there.

Shapes: P [B, G, n, L, K] grouped patches (K = p*p), E [G, n, D, K] per-channel weights, S [G, n, D]
per-channel shifts, valid [G, n] (False = padding) or None.
"""

from __future__ import annotations

import torch


class _WeightedPatchProjection(torch.autograd.Function):
    """out[b,g,l,h,j,e] = sum_{c,k} attn[b,g,l,h,j,c] * P[b,g,c,l,k] * ve[g,h,e,c,k].

    Computed one (head, query token) at a time, so the weighted patches (the size of the input) exist
    for one head at a time; backward recomputes them instead of saving H copies.
    """

    @staticmethod
    def forward(ctx, attn, patches, ve):
        b, g, l, heads, tokens, n = attn.shape
        k, e = patches.shape[-1], ve.shape[2]
        pt = patches.permute(1, 0, 3, 2, 4)  # [G, B, L, n, K]
        ve_flat = ve.reshape(g, heads, e, n * k)  # [G, H, E, n*K]
        out = attn.new_empty(b, g, l, heads, tokens, e)
        for h in range(heads):
            for j in range(tokens):
                a = attn[:, :, :, h, j, :].permute(1, 0, 2, 3)  # [G, B, L, n]
                x = (a[..., None] * pt).reshape(g, b * l, n * k)  # weighted patches, one head
                out[:, :, :, h, j, :] = torch.bmm(x, ve_flat[:, h].transpose(1, 2)).view(g, b, l, e).permute(1, 0, 2, 3)
        ctx.save_for_backward(attn, patches, ve)
        return out

    @staticmethod
    def backward(ctx, grad):
        attn, patches, ve = ctx.saved_tensors
        b, g, l, heads, tokens, n = attn.shape
        k, e = patches.shape[-1], ve.shape[2]
        pt = patches.permute(1, 0, 3, 2, 4)  # [G, B, L, n, K]
        ve_flat = ve.reshape(g, heads, e, n * k)
        d_attn = torch.zeros_like(attn) if ctx.needs_input_grad[0] else None
        d_pt = torch.zeros(g, b, l, n, k, dtype=patches.dtype, device=patches.device) if ctx.needs_input_grad[1] else None
        d_ve = torch.zeros_like(ve_flat) if ctx.needs_input_grad[2] else None
        for h in range(heads):
            for j in range(tokens):
                a = attn[:, :, :, h, j, :].permute(1, 0, 2, 3)  # [G, B, L, n]
                g_out = grad[:, :, :, h, j, :].permute(1, 0, 2, 3).reshape(g, b * l, e)  # [G, B*L, E]
                if d_attn is not None or d_pt is not None:
                    g_x = torch.bmm(g_out, ve_flat[:, h]).view(g, b, l, n, k)  # d out / d weighted patches
                    if d_attn is not None:
                        d_attn[:, :, :, h, j, :] = (g_x * pt).sum(-1).permute(1, 0, 2, 3)
                    if d_pt is not None:
                        d_pt += a[..., None] * g_x
                if d_ve is not None:
                    x = (a[..., None] * pt).reshape(g, b * l, n * k)  # recomputed, not saved
                    d_ve[:, h] += torch.bmm(g_out.transpose(1, 2), x)
        if d_pt is not None:
            d_pt = d_pt.permute(1, 0, 3, 2, 4)  # back to [B, G, n, L, K]
        return d_attn, d_pt, (d_ve.view_as(ve) if d_ve is not None else None)


def weighted_patch_projection(attn: torch.Tensor, patches: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
    """attn [B, G, L, H, k, n], patches [B, G, n, L, K], ve [G, H, E, n, K] -> [B, G, L, H, k, E]."""
    return _WeightedPatchProjection.apply(attn, patches, ve)


def fused_linear_pool(pool, patches: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, valid) -> torch.Tensor:
    """LinearPool applied to tokens it never sees: -> [B, G, k, L, D]."""
    w = pool.effective_weight(valid)  # [G, k, n]
    composed = torch.einsum("gjc,gcdk->gjdck", w, weight)  # [G, k, D, n, K]: parameter-sized
    out = torch.einsum("bgclk,gjdck->bgjld", patches, composed)
    offset = torch.einsum("gjc,gcd->gjd", w, shift) + pool.bias[..., None]  # [G, k, D]
    return out + offset[None, :, :, None, :]


def fused_cross_attention_pool(pool, patches: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, valid) -> torch.Tensor:
    """CrossAttentionPool applied to tokens it never sees: -> [B, G, k, L, D]."""
    e = pool.head_dim
    heads = pool.heads
    q = pool.project_query()  # [G, k, H, e]
    wk = pool.wk.view(pool.wk.shape[0], heads, e, -1)  # [G, H, e, D]
    wv = pool.wv.view(pool.wv.shape[0], heads, e, -1)
    q_keys = torch.einsum("gjhe,ghed->gjhd", q, wk) * e**-0.5  # [G, k, H, D]: query pulled through Wk
    score_w = torch.einsum("gjhd,gcdk->gjhck", q_keys, weight)  # [G, k, H, n, K]
    score_b = torch.einsum("gjhd,gcd->gjhc", q_keys, shift)  # [G, k, H, n]
    scores = torch.einsum("gjhck,bgclk->bglhjc", score_w, patches) + score_b.permute(0, 2, 1, 3)[None, :, None]
    if valid is not None:
        scores = scores.masked_fill(~valid[None, :, None, None, None, :], float("-inf"))
    attn = scores.softmax(dim=-1)  # [B, G, L, H, k, n]
    ve = torch.einsum("ghed,gcdk->gheck", wv, weight)  # [G, H, e, n, K]: Wv_h E_c
    vs = torch.einsum("ghed,gcd->ghec", wv, shift)  # [G, H, e, n]: Wv_h s_c
    heads_out = weighted_patch_projection(attn, patches, ve) + torch.einsum("bglhjc,ghec->bglhje", attn, vs)
    return pool.finish(heads_out.permute(0, 1, 4, 2, 3, 5))  # [B, G, k, L, H, e] -> [B, G, k, L, D]
