"""Channel-parallel D-CHAG with TP and FSDP2 equals the single-device model (gloo, fp32, random inputs).

Each world size is launched once (module-scoped fixtures); the tests below read its results.
"""

from __future__ import annotations

import dist_workers as W
import pytest
import torch

from dchag.parallel.launch import spawn

TOL = 1e-5
FAULTS = {
    "fault/gather-reduce-scatter": (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "parallel.tp=4"],
        "gather-reduce-scatter",
    ),
    "fault/gather-own-slice": (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "parallel.tp=4"],
        "gather-own-slice",
    ),
    "fault/grad-scale": (["model.hierarchy.preset=dchag-L", *W.SPLITS["even"], "parallel.tp=4"], "grad-scale"),
}
EXTRA_4 = {
    "tree/mae/tp4": (
        [
            "model.hierarchy.preset=tree",
            "model.hierarchy.groups=2",
            "data.channels=13",
            "train.task=mae",
            "parallel.tp=4",
        ],
        "none",
    ),
    "tree-two-local-levels/tp4": (
        ["model.hierarchy.preset=tree", "model.hierarchy.groups=4", "data.channels=18", "parallel.tp=4"],
        "none",
    ),
    "naive/flat/tp4": (
        ["model.hierarchy.preset=flat", "data.channels=10", "parallel.mode=naive", "parallel.tp=4"],
        "none",
    ),
    "replicated/dchag-C/fused-vs-materializing/tp4": (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "parallel.mode=replicated", "parallel.tp=4"],
        "none",
        True,
    ),
    "replicated/flat/fused-vs-materializing/tp4": (
        ["model.hierarchy.preset=flat", "data.channels=10", "parallel.mode=replicated", "parallel.tp=4"],
        "none",
        True,
    ),
    "replicated/flat/mae/tp4": (
        [
            "model.hierarchy.preset=flat",
            "data.channels=10",
            "parallel.mode=replicated",
            "train.task=mae",
            "parallel.tp=4",
        ],
        "none",
    ),
    "hsdp/mae/dp_replicate2-tp2": (
        [
            "model.hierarchy.preset=dchag-C",
            *W.SPLITS["uneven"],
            "train.task=mae",
            "parallel.tp=2",
            "parallel.dp_replicate=2",
        ],
        "none",
    ),
    "materializing-front-end/tp4": (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "model.fused_front_end=false", "parallel.tp=4"],
        "none",
    ),
    "materializing-front-end/fsdp2x2": (
        [
            "model.hierarchy.preset=dchag-L",
            *W.SPLITS["uneven"],
            "model.fused_front_end=false",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ],
        "none",
    ),
    "activation-checkpointing/fsdp2x2": (
        [
            "model.hierarchy.preset=dchag-C",
            *W.SPLITS["uneven"],
            "parallel.activation_checkpointing=true",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ],
        "none",
    ),
    "residual-forecast/tp4": (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "model.residual_forecast=true", "parallel.tp=4"],
        "none",
    ),
    "residual-forecast/replicated/tp2-dp2": (
        [
            "model.hierarchy.preset=flat",
            "data.channels=10",
            "model.residual_forecast=true",
            "parallel.mode=replicated",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ],
        "none",
    ),
    "qk_norm/tp4": (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["even"], "model.hierarchy.qk_norm=true", "parallel.tp=4"],
        "none",
    ),
    "vocabulary/tp2-dp2": (
        [
            "model.hierarchy.preset=dchag-C",
            "data.channels=[t2m, u10, v10, z_500, t_850]",
            "model.vocabulary=[q_850, t2m, u10, v10, z_500, t_850, z_50]",
            "model.hierarchy.groups=2",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ],
        "none",
    ),
}


def _four_rank_suite():
    return {
        "parity": W.parity_matrix(
            {"tp4": ["parallel.tp=4"], "fsdp2x2": ["parallel.tp=2", "parallel.dp_shard=2"]}, {**EXTRA_4, **FAULTS}
        ),
        "comm": W.front_end_communication("model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "parallel.tp=4"),
        "comm_linear_last": W.front_end_communication(
            "data.channels=16",
            "model.hierarchy.levels=[{kind: cross_attention, groups: 4}, {kind: linear, groups: 1}]",
            "parallel.tp=4",
        ),
        "share": W.front_end_parameter_share("model.hierarchy.preset=dchag-C", *W.SPLITS["even"], "parallel.tp=4"),
        "rng": W.random_state_consistency(
            "model.hierarchy.preset=dchag-C",
            *W.SPLITS["even"],
            "model.drop_rate=0.5",
            "train.task=mae",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ),
        "round_trip": W.layout_round_trip(),
        "bf16": W.bf16_parameters_step(
            "model.hierarchy.preset=dchag-L", *W.SPLITS["even"], "parallel.tp=2", "parallel.dp_shard=2"
        ),
        # the tokenizer's and the conditioned output's float32 encodings buffer against bf16 weights
        "bf16_tokenizer": W.bf16_parameters_step(
            "model.hierarchy.preset=dchag-C",
            *W.SPLITS["even"],
            "train.task=mae",
            "data.kind=synthetic-hyperspectral",
            "model.tokenizer=hypernetwork",
            "model.channel_specs=[400, {name: vv}, 450, 500, 550, 600, 650, 700, 750, 800, 850, 900, 950, "
            "1000, {name: vh}, 1100]",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ),
    }


def _two_rank_suite():
    return {"parity": W.parity_matrix({"tp2": ["parallel.tp=2"]}), "collectives": W.collectives_both_directions()}


def _one_rank_suite():
    return {"parity": W.parity_matrix({"tp1": []})}


@pytest.fixture(scope="module")
def four():
    return spawn(_four_rank_suite, 4)


@pytest.fixture(scope="module")
def two():
    return spawn(_two_rank_suite, 2)


@pytest.fixture(scope="module")
def one():
    return spawn(_one_rank_suite, 1)


def assert_parity(results: dict, prefix: str = "") -> None:
    checked = {k: v for k, v in results.items() if k.startswith(prefix) and not k.startswith("fault/")}
    assert checked
    bad = {k: v for k, v in checked.items() if v[0] > TOL}
    assert not bad, bad


def test_tp1_matches_single_device_for_both_kinds_and_splits(one):
    assert_parity(one[0]["parity"], "tp1/")


def test_tp2_matches_single_device_for_both_kinds_and_splits(two):
    assert len(two[0]["parity"]) == 8
    assert_parity(two[0]["parity"], "tp2/")


def test_tp4_matches_single_device_for_both_kinds_and_splits(four):
    assert_parity(four[0]["parity"], "tp4/")


def test_fsdp2_on_a_2x2_mesh_matches_single_device(four):
    assert_parity(four[0]["parity"], "fsdp2x2/")


@pytest.mark.parametrize("case", sorted(EXTRA_4))
def test_other_hierarchies_modes_and_meshes_match_single_device(four, case):
    worst, tensors, _ = four[0]["parity"][case]
    assert worst <= TOL, tensors


@pytest.mark.parametrize("world", ["two", "four"])
def test_fused_distributed_front_end_equals_the_materializing_reference(world, request):
    results = request.getfixturevalue(world)[0]["parity"]
    fused_cases = {k: v for k, v in results.items() if k.endswith("/fused-vs-materializing")}
    assert len(fused_cases) == (4 if world == "two" else 8)
    bad = {k: v for k, v in fused_cases.items() if v[0] > TOL}
    assert not bad, bad


def test_gather_with_reduce_scatter_backward_is_caught(four):
    """torch's autograd all-gather (reduce-scatter backward) where the gradient is already complete
    multiplies front-end gradients by tp."""
    worst, tensors, output_rel = four[0]["parity"]["fault/gather-reduce-scatter"]
    assert output_rel <= TOL  # the forward is right ...
    assert worst > 1.0, tensors  # ... and the gradient is (tp - 1) = 3 times off
    assert any(name.startswith("front_end.tokenizer") for name, _ in tensors)


def test_gather_with_own_slice_backward_into_the_head_parallel_level_is_caught(four):
    """The opposite mistake: not summing the head-parallel level's partial input gradients."""
    worst, tensors, output_rel = four[0]["parity"]["fault/gather-own-slice"]
    assert output_rel <= TOL
    assert worst > 0.1, tensors
    assert all(name.startswith("front_end.") for name, _ in tensors)


def test_wrong_gradient_scale_is_caught(four):
    worst, _, _ = four[0]["parity"]["fault/grad-scale"]
    assert worst == pytest.approx(3.0, rel=1e-3)


def test_collectives_work_in_both_directions(two):
    for rank_result in two:
        assert all(rank_result["collectives"].values()), rank_result["collectives"]


def test_dchag_front_end_needs_one_all_gather_one_all_reduce_forward_and_one_reduce_scatter_backward(four):
    for rank_result in four:
        comm = rank_result["comm"]
        assert comm["part_forward"] == {"allgather_": 1}  # D-CHAG proper: one gather of a few tokens
        # the head-parallel last level adds one all-reduce forward; in backward the gather's
        # reduce-scatter is the only collective (it sums that level's partial input gradients)
        assert comm["forward"] == {"allgather_": 1, "allreduce_": 1}
        assert comm["backward"] == {"_reduce_scatter_base_": 1}


def test_gather_before_a_level_that_runs_whole_has_no_backward_collective(four):
    for rank_result in four:
        comm = rank_result["comm_linear_last"]
        assert comm["forward"] == {"allgather_": 1}
        assert comm["backward"] == {}


def test_each_rank_holds_one_tp_th_of_tokenizer_and_level1_parameters(four):
    for rank_result in four:
        share = rank_result["share"]
        assert share["local"] * share["tp"] == share["single"]


def test_dropout_keeps_replicated_activations_bit_identical_within_tp_and_mae_masks_differ_across_dp(four):
    by_rank = {(r["rng"]["dp_rank"], r["rng"]["tp_rank"]): r["rng"] for r in four}
    for dp in (0, 1):
        assert torch.equal(by_rank[(dp, 0)]["latent"], by_rank[(dp, 1)]["latent"])
        assert torch.equal(by_rank[(dp, 0)]["mask"], by_rank[(dp, 1)]["mask"])
    assert not torch.equal(by_rank[(0, 0)]["latent"], by_rank[(1, 0)]["latent"])
    assert not torch.equal(by_rank[(0, 0)]["mask"], by_rank[(1, 0)]["mask"])


def test_weights_saved_at_tp2_load_at_tp1_and_tp4(four):
    for rank_result in four:
        trip = rank_result["round_trip"]
        assert trip["strict_load"] and trip["resave_exact"]
        assert trip["tp1_vs_tp2"] <= TOL and trip["tp4_vs_tp2"] <= TOL, trip


def test_bf16_fsdp_parameters_train_close_to_fp32(four):
    """MixedPrecisionPolicy(bf16 params, fp32 reduction): same loss to bf16 precision, finite gradients."""
    for rank_result in four:
        for name in ("bf16", "bf16_tokenizer"):
            bf16 = rank_result[name]
            assert bf16["finite"], name
            assert bf16["loss_rel"] < 2e-2, (name, bf16)
