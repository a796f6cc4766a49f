"""Initial weights, one parameter at a time, from the config's seed.

Every module that owns parameters says how they start: our modules through an `initial_values(g)`
method, `nn.Linear` and `nn.LayerNorm` by the ViT convention (truncated normal, std 0.02, zero biases;
unit norms). `initial_values(model, seed)` walks the single-device model in a fixed order with one seeded
generator and yields (parameter name, full tensor) one at a time. `init_weights_` copies them into the
model; a rank that builds only its shards (`parallel/construct.py`) copies each one's slices and drops it,
so it never holds more than one whole parameter, and gets the values the single-device model holds.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import nn

VIT_STD = 0.02


def trunc_normal(
    shape: torch.Size, g: torch.Generator, std: float = VIT_STD, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    """N(0, std) truncated to the open interval (a, b) (absolute bounds, as timm/ClimaX), drawn from `g`
    by inverse-CDF sampling entirely in place: `nn.init.trunc_normal_` allocates temporaries (1.75x the
    tensor, measured), and a rank building its shards must hold no more than one whole parameter."""
    lo, hi = (math.erf(bound / (std * math.sqrt(2.0))) for bound in (a, b))
    t = torch.empty(shape).uniform_(lo, hi, generator=g)
    return uniform_to_trunc_normal_(t, std, a, b)


def uniform_to_trunc_normal_(u: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    """Map, in place, draws `u` of U[erf(a/(std*sqrt2)), erf(b/(std*sqrt2))) (as `uniform_` returns them,
    in u's dtype) to N(0, std) truncated to the open interval (a, b).

    `uniform_` can return its lower end itself: for std 0.02 and a = -2 that end is erf(-70.7) = -1.0
    exactly, erfinv(-1) = -inf, and clamping made it a -2.0 (100 sigma) weight, once in 2**24 draws. The
    draws are first moved inside the open interval (the end's neighbouring float, one grid step of the
    uniform draw away, so -1 becomes about -5.4 sigma, as far as float32 tails reach), and the results
    kept strictly inside (a, b) against erfinv's rounding; no other draw changes."""
    # scalars in u's precision, on the host (no tensor: building a rank's shards is measured to the byte,
    # and `info` builds on the meta device)
    real = np.dtype(torch.finfo(u.dtype).dtype).type
    lo, hi = (real(math.erf(x / (std * math.sqrt(2.0)))) for x in (a, b))
    u.clamp_(min=float(np.nextafter(lo, hi)), max=float(np.nextafter(hi, lo)))  # the floats next to the ends
    u.erfinv_().mul_(std * math.sqrt(2.0))
    return u.clamp_(min=float(np.nextafter(real(a), real(b))), max=float(np.nextafter(real(b), real(a))))


def _module_values(module: nn.Module, g: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, initial value) of the parameters `module` owns directly."""
    own = {name: p for name, p in module.named_parameters(recurse=False)}
    if hasattr(module, "initial_values"):
        yield from module.initial_values(g)
    elif isinstance(module, nn.Linear):
        yield "weight", trunc_normal(module.weight.shape, g)
        if module.bias is not None:
            yield "bias", torch.zeros(module.bias.shape)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            yield "weight", torch.ones(module.weight.shape)
        if module.bias is not None:
            yield "bias", torch.zeros(module.bias.shape)
    elif own:
        raise TypeError(f"{type(module).__name__} owns parameters {sorted(own)} but has no initial_values(g)")


def initial_values(model: nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(full parameter name, initial value) for every parameter of the single-device `model`, one at a
    time, in module order; the same values for the same seed whatever device the model is on."""
    g = torch.Generator().manual_seed(seed)
    for prefix, module in model.named_modules():
        for name, value in _module_values(module, g):
            yield (f"{prefix}.{name}" if prefix else name), value
            del value  # before the next one exists


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter of the single-device `model` its initial value (in place)."""
    params = dict(model.named_parameters())
    done = set()
    for name, value in initial_values(model, seed):
        params[name].copy_(value)
        done.add(name)
        del value
    missing = sorted(set(params) - done)
    if missing:
        raise TypeError(f"no initial value for parameters {missing[:5]}")
    return model
