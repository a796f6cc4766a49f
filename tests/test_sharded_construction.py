"""A rank builds only its own shards: it never holds the whole model, and its weights are exactly those
of the single-device model with the same seed (so parity and logical checkpoints hold)."""

from __future__ import annotations

import pytest
import reliability_workers as RW
import torch

from dchag.model import build_model
from dchag.parallel.launch import spawn


@pytest.fixture(scope="module")
def built():
    return spawn(RW.sharded_construction_suite, 4)


@pytest.mark.parametrize("layout", ["dp2-tp2-dchag-C-forecast", "tp4-dchag-L-mae", "tp4-replicated"])
def test_shards_hold_exactly_the_single_device_initial_weights(built, layout):
    for rank in built:
        r = rank[layout]
        assert r["equal"] == r["total"], r["differ"]


def test_the_equality_check_fails_for_another_seed(built):
    assert all(rank["other-seed"]["equal"] < rank["other-seed"]["total"] for rank in built)


@pytest.mark.parametrize("layout", ["dp2-tp2-dchag-C-forecast", "tp4-dchag-L-mae", "tp4-replicated"])
def test_building_peaks_at_the_ranks_share_plus_one_whole_parameter(built, layout):
    """Exact tensor memory (MemTracker): the peak is what the rank keeps (its parameters with FSDP2's
    padding, buffers, shard index tensors) plus the largest single logical parameter, never the whole
    model."""
    for rank in built:
        r = rank[layout]
        assert r["peak"] <= r["kept"] + r["largest"], r
        if layout != "tp4-replicated":  # the TP-only baseline replicates the front end by design
            assert r["peak"] < 0.5 * r["whole"], r


def test_initial_weights_depend_on_the_seed_alone():
    """Built twice, on any global RNG state, the same seed gives the same weights."""
    cfg = RW.resume_config()
    torch.manual_seed(123)
    a = build_model(cfg).state_dict()
    torch.manual_seed(456)
    b = build_model(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
