"""Squared error per patch, summed over a rank's channels, with one image-sized tensor in all.

The MAE decoder predicts patches [B, L, C*p*p]; the target is the input image [B, C, H, W]. The plain
expression `((unpatchify(pred) - x) ** 2)` followed by a patch-layout sum holds, at the start of
backward, the prediction, its image copy, the difference autograd saves for `pow`, and four temporaries
of the gradient chain: seven tensors of the prediction's size, most of a D-CHAG rank's peak at hundreds
of channels. Here the difference is built channel block by channel block straight into patch layout,
nothing large is saved, and backward recomputes the difference as the gradient.
So forward adds no prediction-sized tensor and backward one, in the prediction's dtype (none when
training lets it consume the prediction); the gradient arrives in the decoder's own layout (no
image-layout gradient, no copy back). The arithmetic is done in float32, or float64 for a float64 model
(`torch.promote_types(dtype, float32)`), one channel block at a time.
"""

from __future__ import annotations

import torch
from einops import rearrange

# channels per block while building the difference: the transients (the target's patch-layout copy,
# the squares) are at most this share of the prediction
BLOCKS = 16


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C*p*p] in the decoder's patch order (a copy)."""
    return rearrange(image, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch, p2=patch)


def _blocks(channels: int):
    step = max(1, -(-channels // BLOCKS))
    return [(c0, min(channels, c0 + step)) for c0 in range(0, channels, step)]


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """The dtype the error is computed in: float32, or wider when the prediction is."""
    return torch.promote_types(dtype, torch.float32)


def _difference(patches, target, valid, patch: int, c0: int, c1: int, out=None) -> torch.Tensor:
    """(patches - target) of channels [c0, c1) in patch layout [B, L, (c1-c0)*p*p], in `_accumulate`'s
    dtype, zero where not `valid`; written into `out` (of that dtype) when given."""
    pp, acc = patch * patch, _accumulate(patches.dtype)
    block = torch.sub(patches[..., c0 * pp : c1 * pp].to(acc), patchify(target[:, c0:c1].to(acc), patch), out=out)
    if valid is not None:
        block.masked_fill_(~patchify(valid[:, c0:c1], patch), 0.0)
    return block


class _PatchSquaredError(torch.autograd.Function):
    """patches [B, L, C*p*p], target [B, C, H, W], valid [B, C, H, W] or None -> sse [B, L] (float32, or
    float64 for float64 patches):
    per patch the sum over channels and pixels of (patches - target)^2, pixels where `valid` is False
    left out. Nothing image-sized is made in forward (the difference exists one channel block at a
    time) or saved (patches and target are saved by reference). Backward: d sse / d patches =
    2 (patches - target), one new tensor of the patches' dtype, or with `consume` (patches that nobody
    reads afterwards: training) written into the patches' own storage, which can then happen once only."""

    @staticmethod
    def forward(ctx, patches, target, valid, patch, consume):
        b, l, _ = patches.shape
        sse = torch.zeros(b, l, dtype=_accumulate(patches.dtype), device=patches.device)
        for c0, c1 in _blocks(target.shape[1]):
            sse += _difference(patches, target, valid, patch, c0, c1).square().sum(-1)
        ctx.save_for_backward(patches, target, valid)
        ctx.patch, ctx.used = patch, False
        ctx.consume = consume and patches.dtype.is_floating_point and patches.is_contiguous()
        return sse

    @staticmethod
    def backward(ctx, grad):  # grad [B, L]
        if ctx.used:
            raise RuntimeError("the MAE loss consumed its prediction in backward and runs once: do not retain_graph")
        ctx.used = ctx.consume
        patches, target, valid = ctx.saved_tensors
        pp = ctx.patch**2
        out = patches if ctx.consume else torch.empty(patches.shape, dtype=patches.dtype, device=patches.device)
        acc = _accumulate(patches.dtype)
        scale = 2 * grad.to(acc)[..., None]  # [B, L, 1]
        for c0, c1 in _blocks(target.shape[1]):
            block = out[..., c0 * pp : c1 * pp]
            if out.dtype == acc:  # straight into the gradient
                _difference(patches, target, valid, ctx.patch, c0, c1, out=block).mul_(scale)
            else:  # e.g. bf16: the block in float32, rounded once into the gradient
                block.copy_(_difference(patches, target, valid, ctx.patch, c0, c1).mul_(scale))
        return out, None, None, None, None


def patch_sse(
    patches: torch.Tensor, target: torch.Tensor, patch: int, valid: torch.Tensor | None = None, consume: bool = False
) -> torch.Tensor:
    """Per-patch squared error [B, L] of predicted `patches` [B, L, C*p*p] against the image `target`
    [B, C, H, W] (data: no gradient to it); `valid` [B, C, H, W] (bool) leaves pixels out. `consume`:
    the caller will not read `patches` again (training), so their storage may hold the error."""
    return _PatchSquaredError.apply(patches, target.detach(), valid, patch, consume)


def patch_counts(valid: torch.Tensor, patch: int) -> torch.Tensor:
    """valid [B, C, H, W] (bool) -> the number of valid pixels per patch [B, L] (float32), over channels."""
    b, c, hh, ww = valid.shape
    per = valid.view(b, c, hh // patch, patch, ww // patch, patch).sum(dim=(1, 3, 5))  # [B, h, w], no copy
    return per.reshape(b, -1).float()
