"""Numerical comparison of tensors and gradient sets, as used by parity checks and equivalence tests.

The measure is max |a - b| / max |b| per tensor. Key biases (the self-attention key bias, the bias of a
LayerNorm on keys) have gradients that are zero in exact arithmetic: softmax ignores a shift common to
all keys, so both sides are rounding noise. Their denominator is 1e-3 of the largest gradient in the
model. Every other tensor is measured against its own size (floor 1e-6 of that scale, only to avoid 0/0).
"""

from __future__ import annotations

import torch

GRAD_FLOOR = 1e-6
ZERO_GRAD_FLOOR = 1e-3
ZERO_GRAD_SUFFIXES = ("attn.wk.bias", "k_norm.bias")


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max |a - b| / max |b|; `floor` bounds the denominator from below."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:  # nothing to compare (a tensor-parallel rank without output channels)
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp(min=floor))


def grad_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: relative error} of `grads` against `reference` for every reference tensor."""
    scale = max(float(g.abs().max()) for g in reference.values())
    return {
        name: rel_err(grads[name], ref, scale * (ZERO_GRAD_FLOOR if name.endswith(ZERO_GRAD_SUFFIXES) else GRAD_FLOOR))
        for name, ref in reference.items()
    }
