"""Context parallelism (`parallel.cp`): each rank holds a strip of patch rows, attention gathers keys and
values over the CP group. Every layout equals the single-device model (loss, outputs, every gradient),
on both tasks, with uneven strips and uneven channel groups; the checks catch a missing gradient sum,
a wrong exchange backward and wrong dropout streams.

One 4-rank gloo launch computes the layouts cp 2 x tp 2, cp 2 x dp_shard 2 and cp 2 x dp_replicate 2
(module-scoped fixture);
cp 2 alone and the checkpoints are in tests/test_context_parallel_resume.py.
"""

from __future__ import annotations

import cp_workers as CW
import pytest
import torch

from dchag.checks.parity import BF16_TOLERANCE, FP32_TOLERANCE
from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.model.vit import StripDropout, attend
from dchag.parallel.context_parallel import StripLayout, row_strips, strip_masking
from dchag.parallel.launch import spawn


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    from era5_files import dataset, with_sea_field, write

    nan_path = write(with_sea_field(dataset(times=16)), tmp_path_factory.mktemp("cp-nan") / "sea.nc", "netcdf")
    return spawn(CW.four_rank_suite, 4, str(nan_path))


def _parity(four, prefix: str) -> dict:
    return {k: v for k, v in four[0]["parity"].items() if k.startswith(prefix)}


def test_cp2_x_tp2_and_cp2_x_dp_shard2_match_the_single_device_model_on_both_tasks(four):
    cases = _parity(four, "cp2x")
    assert len(cases) == 4  # 2 layouts x 2 tasks, each layout with both level-1 kinds
    bad = {k: v for k, v in cases.items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad


def test_context_parallelism_in_the_settings_users_train_with(four):
    """Even strips, the materializing front end, the masked MAE loss, rollout training, activation
    checkpointing (MAE and forecast), forecast dropout drawn exactly as one device emulating the layout
    draws it; NaN-masked file data (data.nan=mask: validity counts summed over the strips, both tasks),
    random band subsets (train.channel_subset, both tasks), an MAE standardised by its visible pixels
    (model.visible_norm: the pixel sums added over the strips and the subset's left-out bands kept in
    the data's units, at cp 2 x tp 2), HSDP (dp_replicate) and the naive and replicated front ends."""
    cases = _parity(four, "settings/")
    assert len(cases) == 14
    bad = {k: v for k, v in cases.items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad


def test_context_parallelism_in_bf16_is_within_the_bf16_tolerance(four):
    cases = _parity(four, "bf16/")
    assert len(cases) == 2
    bad = {k: v for k, v in cases.items() if v[0] > BF16_TOLERANCE}
    assert not bad, bad


@pytest.mark.parametrize("fault", ["cp-grad-sum", "cp-kv-own-slice", "cp-dropout-streams"])
def test_the_parity_check_catches_context_parallel_faults(four, fault):
    """Gradients not summed over CP, the key/value gather keeping its own slice in backward, every CP rank
    drawing strip 0's dropout masks: each is an error of order 1, far above the tolerance."""
    worst, tensors = four[0]["parity"][f"fault/{fault}"]
    assert worst > 0.1, tensors


def test_the_key_value_exchange_gathers_forward_and_reduce_scatters_backward(four):
    for rank_result in four:
        assert rank_result["exchange"] == {"forward": True, "backward": True}


def test_a_vit_block_at_cp2_x_tp2_needs_two_gathers_and_one_reduce_scatter_on_top_of_tp(four):
    """Keys and values travel together: on the CP group one all-gather of both forward, and backward one
    more (recomputing them) and one reduce-scatter of their gradients per block; the TP all-reduces are
    unchanged; FSDP2 shards the block's weights over the CP ranks."""
    for rank_result in four:
        comm = rank_result["block_comm"]
        cp = {k: v["count"] for k, v in comm["cp"].items()}
        # the backward all-gather is the recomputation's (see the saved-tensor test below)
        assert cp == {"forward/allgather_": 1, "backward/allgather_": 1, "backward/_reduce_scatter_base_": 1}, cp
        # besides: TP's two all-reduces each way, and FSDP2's parameter gathers and gradient reductions (over
        # dp_shard x cp, then HSDP's dp_replicate, here of one rank)
        tp = {"forward/all_reduce": 2, "backward/all_reduce": 2}
        groups = [tp, *({k: v["count"] for k, v in comm[g].items()} for g in ("cp", "fsdp", "replicate"))]
        every = {k: v["count"] for k, v in comm["all"].items()}
        assert every == {k: sum(g.get(k, 0) for g in groups) for k in {*every, *tp}}, comm
        assert comm["fsdp"], comm
        assert comm["cp"]["forward/allgather_"]["bytes"] == comm["kv_bytes"]
        assert comm["cp"]["backward/allgather_"]["bytes"] == comm["kv_bytes"]


def test_a_block_keeps_only_strip_sized_tensors_for_backward_and_gathers_the_keys_again(four):
    """The whole sequence's keys and values [B, H/tp, L, e] are not kept for backward (the gather and the
    attention are recomputed; the strip's own are), with the same gradients; counter-check: without the
    recomputation they are."""
    for rank_result in four:
        saved = rank_result["saved"]
        assert saved["recomputed"]["whole_sequence_bytes"] == 0, saved
        assert saved["kept"]["whole_sequence_bytes"] >= saved["kv_bytes"], saved
        assert saved["recomputed"]["bytes"] < saved["kept"]["bytes"], saved
        assert saved["same_grads"]


# ---------------------------------------------------------------------------------------------------
# one process: strips, MAE masks, dropout streams, config errors


def test_strips_are_contiguous_whole_rows_the_first_ones_one_row_longer():
    assert row_strips(5, 2) == [(0, 3), (3, 5)]
    assert row_strips(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert row_strips(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("cp", [2, 3])
def test_every_rank_knows_every_strip_s_share_of_one_device_s_mae_mask(cp):
    """The ranks' visible tokens together are one device's, each rank's in one device's order; the key
    order puts the gathered tokens back into one device's order; the decoder slots point at them."""
    from dchag.model.heads import random_masking

    grid_h, grid_w, ratio = 5, 4, 0.6
    noise = torch.rand(3, grid_h * grid_w, generator=torch.Generator().manual_seed(cp))
    keep, _, mask = random_masking(noise, ratio)
    rows = row_strips(grid_h, cp)
    parts = [strip_masking(noise, ratio, StripLayout(r, rows, grid_w, 4, None)) for r in range(cp)]
    n_max = parts[0].visible.shape[1]
    strips = [StripLayout(r, rows, grid_w, 4, None).tokens for r in range(cp)]
    gathered = torch.cat([p.visible + s.start for p, s in zip(parts, strips)], dim=1)  # [B, cp * n_max]
    assert torch.equal(torch.gather(gathered, 1, parts[0].key_order), keep)
    for r, (part, strip) in enumerate(zip(parts, strips)):
        assert torch.equal(part.key_order, parts[0].key_order)  # the same on every rank
        assert torch.equal(part.mask, mask[:, strip])
        visible = part.slots < n_max
        assert torch.equal(visible, part.mask == 0)
        slots = part.slots.clamp(max=n_max - 1)
        positions = torch.gather(part.visible, 1, slots) + strip.start
        assert torch.equal(positions[visible], torch.arange(strip.start, strip.stop).expand_as(slots)[visible])


def test_one_device_s_mask_layout_sends_each_patch_to_its_encoder_output_or_the_mask_token():
    """The single-device `MaskLayout` the decoder assembles from (`MAEDecoder.assemble`), which a CP rank's
    `strip_masking` also gives: a visible patch's slot is its row among the encoder's outputs, a masked
    patch's slot is n, the mask token's."""
    from dchag.model.heads import mask_layout

    noise = torch.rand(3, 20, generator=torch.Generator().manual_seed(0))
    layout = mask_layout(noise, 0.6)
    n = layout.visible.shape[1]
    visible = layout.slots < n
    assert n == 8 and torch.equal(visible, layout.mask == 0)
    rows = torch.gather(layout.visible, 1, layout.slots.clamp(max=n - 1))  # the patch each slot points at
    assert torch.equal(rows[visible], torch.arange(20).expand(3, 20)[visible])


def test_one_device_emulating_a_cp_layout_draws_each_strip_s_dropout_masks():
    """Attention dropout (queries of one strip against every key) and residual dropout of rank j's strip
    equal the single-device call that draws per strip, and leave the global generator in step."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 7, 4, generator=g) for _ in range(3))  # [B, H, L, e]
    x = torch.randn(2, 7, 5, generator=g)  # [B, L, D]
    sizes = (4, 3)
    drop = StripDropout(0.5)
    torch.manual_seed(11)
    single = attend(q, k, v, 0.5, (0, 2), (0, sizes))
    drop.strips = (0, sizes)
    single_x = drop(x)
    after_single = torch.rand(3)
    for j, part in enumerate(torch.arange(7).split(sizes)):
        torch.manual_seed(11)
        mine = attend(q[:, :, part], k, v, 0.5, (0, 2), (j, (len(part),)))
        drop.strips = (j, (len(part),))
        mine_x = drop(x[:, part])
        assert torch.equal(mine, single[:, :, part])
        assert torch.equal(mine_x, single_x[:, part])
        assert torch.equal(torch.rand(3), after_single)
    torch.manual_seed(11)
    assert not torch.equal(attend(q, k, v, 0.5, (0, 2)), single)  # the strips matter


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.cp=5"], "parallel.cp=5 exceeds the 4 patch rows"),
        (["parallel.cp=2", "train.task=mae", "model.drop_rate=0.1"], "dropout of a context-parallel MAE"),
    ],
)
def test_impossible_context_parallel_layouts_are_refused_in_one_line(overrides, message):
    from dist_workers import SMALL_MODEL

    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL_MODEL, *overrides])
