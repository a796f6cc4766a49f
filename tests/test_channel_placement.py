"""Where channels and groups go on TP ranks (pure bookkeeping, no processes needed)."""

import pytest
from conftest import small_config

from dchag.config import ConfigError
from dchag.model import build_model
from dchag.parallel.channel_parallel import place_channels


def placement(tp, mode="dchag", *overrides):
    return place_channels(build_model(small_config(*overrides)).front_end, tp, mode)


def test_uneven_groups_are_split_in_contiguous_blocks():
    # 11 channels in 5 groups of [3, 2, 2, 2, 2]; 4 ranks own groups [2, 1, 1, 1]
    p = placement(4, "dchag", "data.channels=11", "model.hierarchy.groups=5")
    assert p.channel_ranges == [(0, 5), (5, 7), (7, 9), (9, 11)]
    assert p.level_group_ranges[0] == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert p.gathered_counts == [2, 1, 1, 1] and p.local_levels == 1


def test_a_level_whose_groups_stay_inside_ranks_runs_before_the_gather():
    # tree with 8 -> 4 -> 1 groups on 4 ranks: level 2 groups pair up each rank's two tokens
    p = placement(4, "dchag", "data.channels=16", "model.hierarchy.preset=tree", "model.hierarchy.groups=4")
    assert p.local_levels == 2 and p.gathered_counts == [1, 1, 1, 1]


def test_a_level_straddling_ranks_runs_after_the_gather():
    # tree with 4 -> 2 -> 1 groups on 4 ranks: level 2 groups span two ranks each
    p = placement(4, "dchag", "data.channels=16", "model.hierarchy.preset=tree", "model.hierarchy.groups=2")
    assert p.local_levels == 1 and p.gathered_counts == [1, 1, 1, 1]


def test_naive_mode_splits_raw_channels_and_replicated_mode_keeps_all():
    assert placement(4, "naive", "data.channels=10").gathered_counts == [3, 3, 2, 2]
    p = placement(4, "replicated", "data.channels=10")
    assert p.channel_ranges == [(0, 10)] * 4 and p.gathered_counts == []


def test_too_few_groups_for_the_ranks_is_a_config_error():
    with pytest.raises(ConfigError, match="groups >= 4"):
        placement(4, "dchag", "data.channels=10", "model.hierarchy.groups=3")


def test_flat_model_cannot_be_channel_parallel():
    with pytest.raises(ConfigError, match="replicated or naive"):
        placement(2, "dchag", "model.hierarchy.preset=flat")
