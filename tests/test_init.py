"""Initial weights: the in-place truncated normal never reaches its bounds and has the moments of the
truncated normal it claims to be."""

from __future__ import annotations

import math

import torch

from dchag.model.init import trunc_normal, uniform_to_trunc_normal_

N = 10_000_000
EPS = torch.finfo(torch.float32).eps
# seed 1 draws the uniform's lower end, erf(-2 / (0.02 * sqrt2)) = -1.0 exactly, once in its first N values
SEED_HITTING_THE_END = 1


def _old_uniform_to_trunc_normal_(u: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    """The map trunc_normal used before: erfinv of the raw draw, clamped to [a, b]."""
    return u.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(min=a, max=b)


def test_the_lowest_uniform_draw_maps_inside_the_bounds_where_the_old_map_returned_the_bound():
    lo = math.erf(-2.0 / (0.02 * math.sqrt(2.0)))
    assert torch.tensor(lo).item() == -1.0  # float32: the end is -1 itself, erfinv(-1) = -inf
    old = _old_uniform_to_trunc_normal_(torch.tensor([lo]), 0.02, -2.0, 2.0)
    assert old.item() == -2.0  # the counter-check: a 100-sigma weight
    new = uniform_to_trunc_normal_(torch.tensor([lo]), 0.02, -2.0, 2.0).item()
    assert math.isfinite(new) and -6 * 0.02 < new < -5 * 0.02  # the float next to -1: about -5.4 sigma
    # relative bounds: the lower end of U maps strictly inside -2 sigma
    lo2 = math.erf(-math.sqrt(2.0))
    assert -0.04 * (1 - EPS) < uniform_to_trunc_normal_(torch.tensor([lo2]), 0.02, -0.04, 0.04).item() < 0


def test_ten_million_vit_weights_have_a_normal_tail_and_never_reach_the_bounds():
    """std 0.02 truncated at the absolute +-2 of timm/ClimaX: the largest of 10M draws is a few sigma, as
    for a normal, from the same generator state that gave the old sampler a -2.0."""
    values = trunc_normal(torch.Size([N]), torch.Generator().manual_seed(SEED_HITTING_THE_END))
    assert torch.isfinite(values).all()
    assert values.abs().max().item() < 7 * 0.02

    g = torch.Generator().manual_seed(SEED_HITTING_THE_END)
    lo, hi = (math.erf(x / (0.02 * math.sqrt(2.0))) for x in (-2.0, 2.0))
    old = _old_uniform_to_trunc_normal_(torch.empty(N).uniform_(lo, hi, generator=g), 0.02, -2.0, 2.0)
    assert old.min().item() == -2.0  # the same check fails on the old sampler


def test_weights_truncated_at_two_sigma_stay_strictly_inside_with_the_truncated_normal_moments():
    std, beta = 0.02, 2.0
    values = trunc_normal(torch.Size([N]), torch.Generator().manual_seed(0), std, -beta * std, beta * std)
    assert values.abs().max().item() < beta * std * (1 - EPS)
    v = values.double()
    # N(0, 1) truncated to [-beta, beta]: variance 1 - 2 beta phi(beta) / (2 Phi(beta) - 1)
    phi = math.exp(-(beta**2) / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(beta / math.sqrt(2.0))  # 2 Phi(beta) - 1
    expected_std = std * math.sqrt(1 - 2 * beta * phi / mass)
    assert abs(v.mean().item()) < 5 * expected_std / math.sqrt(N)  # 5 standard errors
    assert abs(v.std().item() / expected_std - 1) < 5 / math.sqrt(2 * N)  # a std's rel. s.e. <= 1/sqrt(2N)
    within_one_sigma = (v.abs() < std).double().mean().item()
    p = math.erf(1 / math.sqrt(2.0)) / mass  # P(|z| < 1 | |z| < beta)
    assert abs(within_one_sigma - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_the_moment_checks_catch_an_untruncated_normal():
    """Counter-check of the moment test: plain N(0, std) draws (no truncation) fail the std check."""
    std, beta = 0.02, 2.0
    values = torch.empty(N, dtype=torch.float64).normal_(0, std, generator=torch.Generator().manual_seed(0))
    phi = math.exp(-(beta**2) / 2) / math.sqrt(2 * math.pi)
    expected_std = std * math.sqrt(1 - 2 * beta * phi / math.erf(beta / math.sqrt(2.0)))
    assert abs(values.std().item() / expected_std - 1) > 5 / math.sqrt(2 * N)
    assert values.abs().max().item() > beta * std
