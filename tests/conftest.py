"""Shared helpers: small configs and random re-initialisation (so tests never rely on special inits)."""

from __future__ import annotations

import pytest
import torch
from dist_workers import SMALL_MODEL

from dchag.configure import load_config


def small_config(*overrides: str):
    """A model small enough for unit tests: 10 channels in 3 groups, batch 2."""
    return load_config(
        None, SMALL_MODEL + ["data.channels=10", "model.hierarchy.groups=3", "train.batch_size=2", *overrides]
    )


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised queries would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
