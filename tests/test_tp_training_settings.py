"""Tensor parallelism in the settings users train with: bf16, dropout, clipping, long runs, bad data,
fine-tuning (`train.init_from` with `train.freeze`) under FSDP2 x TP.

One 4-rank gloo launch computes everything (module-scoped fixture); the tests read its results.
"""

from __future__ import annotations

import dist_workers as W
import fine_tuning_workers as FW
import pytest
import tokenizer_workers as TW
import torch

from dchag.checks.parity import BF16_TOLERANCE, FP32_TOLERANCE
from dchag.model import build_model
from dchag.model.parts import part_of
from dchag.parallel.launch import spawn
from dchag.tasks.channel_subset import channel_keep_for_step
from dchag.train.init_from import init_from

LAYOUTS = {"tp4": ["parallel.tp=4"], "fsdp2x2": ["parallel.tp=2", "parallel.dp_shard=2"]}
FUSED = {"fused": "model.fused_front_end=true", "materializing": "model.fused_front_end=false"}


def _bf16_cases() -> dict:
    cases = {}
    for lname, layout in LAYOUTS.items():
        for kind, kind_set in W.KINDS.items():
            for fname, fused in FUSED.items():
                cases[f"bf16/{lname}/{kind}/{fname}"] = (
                    [kind_set, *W.SPLITS["uneven"], fused, *layout, "train.bf16=true"],
                    "none",
                )
    cases["bf16/tp4/mae/C"] = (
        ["model.hierarchy.preset=dchag-C", *W.SPLITS["even"], "train.task=mae", "parallel.tp=4", "train.bf16=true"],
        "none",
    )
    cases["fault/bf16/grad-scale"] = (
        ["model.hierarchy.preset=dchag-L", *W.SPLITS["even"], "parallel.tp=4", "train.bf16=true"],
        "grad-scale",
    )
    return cases


def _dropout_cases() -> dict:
    cases = {}
    for kind, kind_set in W.KINDS.items():
        for fname, fused in FUSED.items():
            cases[f"dropout/tp4/{kind}/{fname}"] = (
                [kind_set, *W.SPLITS["uneven"], fused, "parallel.tp=4", "model.drop_rate=0.3"],
                "none",
            )
    cases["dropout/tp4/mae/L"] = (
        ["model.hierarchy.preset=dchag-L", *W.SPLITS["even"], "train.task=mae", "parallel.tp=4", "model.drop_rate=0.3"],
        "none",
    )
    cases["dropout+bf16/tp4/C"] = (
        [
            "model.hierarchy.preset=dchag-C",
            *W.SPLITS["even"],
            "parallel.tp=4",
            "model.drop_rate=0.3",
            "train.bf16=true",
        ],
        "none",
    )
    return cases


# rollout training (train.rollout_steps) under FSDP2 x TP; tp=2 alone: tests/test_fine_tuning.py
ROLLOUT_CASES = {
    "rollout/fsdp2x2/C": (
        [
            "model.hierarchy.preset=dchag-C",
            *W.SPLITS["uneven"],
            "model.residual_forecast=true",
            "train.rollout_steps=2",
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ],
        "none",
    ),
}


# train.channel_subset at tp = 4: step 0 keeps channels 3, 7 and 10 of the 11 (max=3), so level-1 groups
# 0 and 2 lose every channel and TP rank 1 (group 2) keeps none of its own
SUBSET = ["train.channel_subset.p=1", "train.channel_subset.max=3", *W.SPLITS["uneven"], "parallel.tp=4"]


def _subset_cases() -> dict:
    cases = {}
    for kind, kind_set in W.KINDS.items():
        for fname, fused in FUSED.items():
            cases[f"subset/tp4/{kind}/{fname}"] = ([kind_set, fused, *SUBSET], "none")
        cases[f"subset/tp4/{kind}/fused-vs-materializing"] = ([kind_set, *SUBSET], "none", True)
    cases["subset/tp4/mae/C"] = (["model.hierarchy.preset=dchag-C", "train.task=mae", *SUBSET], "none")
    cases["subset/tp4/naive/C"] = (["model.hierarchy.preset=dchag-C", "parallel.mode=naive", *SUBSET], "none")
    cases["fault/subset/other-seed-on-rank-1"] = (["model.hierarchy.preset=dchag-C", *SUBSET], "channel-subset-seed")
    return cases


def _suite(root: str):
    dchag_c = ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"]]
    spare_vocab = [
        "model.hierarchy.preset=dchag-C",
        "data.channels=[t2m, u10, v10, z_500, t_850, q_850, z_250]",
        "model.vocabulary=[q_500, t2m, u10, v10, z_500, t_850, q_850, z_250, z_50]",
        "model.hierarchy.groups=4",
    ]
    return {
        "parity": W.parity_matrix(
            {}, {**_bf16_cases(), **_dropout_cases(), **ROLLOUT_CASES, **_subset_cases(), **TW.parity_cases()}
        ),
        "step_comm": W.step_communication(*dchag_c, "parallel.tp=4"),
        "step_comm_mae": W.step_communication(
            "model.hierarchy.preset=dchag-L", *W.SPLITS["even"], "train.task=mae", "parallel.tp=4"
        ),
        "streams": W.attention_dropout_streams(),
        "replicas": W.replica_check(*dchag_c, "model.drop_rate=0.2", "parallel.tp=2", "parallel.dp_shard=2"),
        "nan": W.nan_in_one_rank(*dchag_c, "parallel.tp=4"),
        # clipping engaged (threshold far below the gradient norm), spare vocabulary rows, FSDP2 + TP
        "steps_fsdp": W.optimizer_steps_match(
            *spare_vocab, "train.grad_clip=0.01", "parallel.tp=2", "parallel.dp_shard=2"
        ),
        "steps_tp4": W.optimizer_steps_match(*spare_vocab, "train.grad_clip=0.01", "parallel.tp=4"),
        "steps_mae": W.optimizer_steps_match(
            "model.hierarchy.preset=dchag-L",
            *W.SPLITS["even"],
            "train.task=mae",
            "train.grad_clip=0.01",
            "parallel.tp=4",
        ),
        # init_from (a linear level whose first group grew) and train.freeze=[blocks] at dp_shard 2 x tp 2
        "fine_tuning": FW.fsdp_fine_tuning(root),
        # model.tokenizer wavelength / hypernetwork: a missing sum of shared weights' gradients; the meta build
        "tokenizer_unsummed": TW.unsummed_shared_gradients(),
        "tokenizer_built": TW.built_rank_by_rank(),
        # the training step's consumed MAE prediction against the kept one, fp32 and bf16 autocast
        "consume": {
            name: W.consumed_and_kept_gradients(
                "model.hierarchy.preset=dchag-L", *W.SPLITS["even"], "train.task=mae", "parallel.tp=4", *extra
            )
            for name, extra in {"fp32": [], "bf16": ["train.bf16=true"]}.items()
        },
    }


@pytest.fixture(scope="module")
def pretrained_linear(tmp_path_factory):
    """The pretrained model of the fine-tuning case: a linear level-1 model as an exported file."""
    return FW.perturbed_export(FW.PRETRAIN_LINEAR, tmp_path_factory.mktemp("fine-tuning") / "linear.safetensors")


@pytest.fixture(scope="module")
def four(pretrained_linear):
    return spawn(_suite, 4, str(pretrained_linear.parent))


def test_bf16_parallel_equals_bf16_single_device_within_eight_unit_roundoffs(four):
    """Both sides in bf16 autocast: differences are rounding (a few bf16 unit roundoffs), for L and C,
    fused and materializing, under TP and TP x FSDP2."""
    cases = {k: v for k, v in four[0]["parity"].items() if k.startswith("bf16/")}
    assert len(cases) == 9
    bad = {k: v for k, v in cases.items() if v[0] > BF16_TOLERANCE}
    assert not bad, bad


def test_bf16_check_still_catches_a_wrong_gradient_scale(four):
    worst, _, _ = four[0]["parity"]["fault/bf16/grad-scale"]
    assert worst == pytest.approx(3.0, rel=0.05)  # (tp - 1): about 100 times the bf16 tolerance


def test_dropout_under_tp_draws_exactly_the_single_device_masks_of_a_tp_way_layout(four):
    """With dropout on (attention and residual), the parallel step equals the single-device step whose
    attention heads draw their masks per block of H/tp heads: to fp32 rounding, not just in distribution."""
    cases = {k: v for k, v in four[0]["parity"].items() if k.startswith("dropout/")}
    assert len(cases) == 5
    bad = {k: v for k, v in cases.items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad
    worst, tensors, _ = four[0]["parity"]["dropout+bf16/tp4/C"]
    assert worst <= BF16_TOLERANCE, tensors


def test_rollout_training_under_fsdp2_x_tp_has_the_single_device_loss_and_gradients(four):
    worst, tensors, _ = four[0]["parity"]["rollout/fsdp2x2/C"]
    assert worst <= FP32_TOLERANCE, tensors


def test_band_subset_training_at_tp4_has_the_single_device_loss_and_gradients(four):
    """train.channel_subset on, groups and a whole rank left without channels: L and C, fused and
    materializing, MAE and the naive mode equal one device to fp32 rounding (loss, outputs, gradients)."""
    keep = channel_keep_for_step(W.config(*SUBSET), 0, 11)
    assert keep.tolist() == [i in (3, 7, 10) for i in range(11)]  # the coverage the cases rely on
    cases = {k: v for k, v in four[0]["parity"].items() if k.startswith("subset/")}
    assert len(cases) == 8
    bad = {k: v for k, v in cases.items() if v[0] > FP32_TOLERANCE}
    assert not bad, bad


def test_band_subset_check_catches_a_rank_that_draws_another_subset(four):
    worst, tensors, _ = four[0]["parity"]["fault/subset/other-seed-on-rank-1"]
    assert worst > 1e-2, tensors


def test_attention_dropout_masks_differ_across_tp_ranks_and_match_the_single_device_blocks(four):
    for rank_result in four:
        streams = rank_result["streams"]
        assert streams["equals_single_device_block"]
        assert streams["differs_from_rank0"]  # head h and head h + H/T do not share a mask
        assert streams["generator_in_step"]  # everything outside attention keeps identical masks


def test_a_vit_block_needs_two_all_reduces_forward_and_two_backward(four):
    for rank_result in four:
        block = rank_result["step_comm"]["block"]
        assert {k: v["count"] for k, v in block.items()} == {"forward/all_reduce": 2, "backward/all_reduce": 2}


def test_training_step_collectives_are_pinned(four):
    """depth 1: the front end's gather and last-level all-reduce, the block's four all-reduces, the
    channel-parallel forecast head (loss sum forward, input gradient backward), one flat all-reduce of
    partial gradients, one for the gradient norm, one for the failure decision."""
    for rank_result in four:
        step = {k: v["count"] for k, v in rank_result["step_comm"]["step"].items()}
        assert step == {
            "forward/allgather_": 1,
            "forward/allreduce_": 5,  # last level, loss; after backward: partial grads, norm, decision
            "forward/all_reduce": 2,
            "backward/all_reduce": 2,
            "backward/allreduce_": 1,  # the head's input gradient [B, L, D]
            "backward/_reduce_scatter_base_": 1,
        }


def test_channel_parallel_mae_never_moves_a_full_channel_reconstruction(four):
    """The decoder's output rows are split by channel: the largest collective of an MAE step is the
    gather's [B, T, L, D] reduce-scatter, not the [B, C, H, W] reconstruction gradient."""
    for rank_result in four:
        step = rank_result["step_comm_mae"]["step"]
        image_bytes = 4 * 16 * 16 * 32 * 4  # [B, C, H, W] fp32 of the test config
        assert max(v["bytes"] / v["count"] for v in step.values()) <= image_bytes / 2, step


def test_replicated_weights_stay_identical_and_a_divergence_is_caught_on_every_rank(four):
    messages = {r["replicas"]["message"] for r in four}
    assert len(messages) == 1  # every rank raises the same error
    message = messages.pop()
    assert message is not None and "blocks.0.norm1.weight" in message and "TP rank(s) [1]" in message
    assert four[0]["replicas"]["replicated"] > 10


def test_nan_on_one_rank_stops_every_rank_in_the_same_step_naming_rank_and_channel(four):
    results = [r["nan"] for r in four]
    assert {r["step"] for r in results} == {1}
    assert len({r["message"] for r in results}) == 1
    bad_channel = results[2]["channels"][1]
    message = results[0]["message"]
    assert f"rank 2: input channel {bad_channel!r} holds NaN/Inf" in message, message
    assert max(r["seconds"] for r in results) < 60  # a decision, not a process-group timeout


@pytest.mark.parametrize("case", ["steps_fsdp", "steps_tp4", "steps_mae"])
def test_optimizer_steps_with_clipping_engaged_match_single_device(four, case):
    """Three AdamW steps with weight decay and the gradient norm far above the clipping threshold: the
    logical weights (including vocabulary rows no channel uses) equal the single-device model's."""
    result = four[0][case]
    assert min(result["norms"]) > 10 * result["clip"]  # clipping engaged in every step
    assert result["worst"] < 1e-5, result


def test_init_from_under_fsdp2_x_tp_gives_the_single_device_weights(four, pretrained_linear):
    """Every logical weight after `init_from` at dp_shard 2 x tp 2 equals the single-device model's, the
    loaded rows (by channel and group, the grown linear group's slots included) and the fresh ones alike."""
    cfg = FW.fine_tune_config(pretrained_linear, *FW.grown_first_group(), "train.freeze=[blocks]")
    model = build_model(cfg)
    report = init_from(cfg, model, None, pretrained_linear)
    assert "front_end.hierarchy.levels.0.aggregator.weight" in report.partial  # the widened [G, k, n_max]
    single, parallel = model.state_dict(), four[0]["fine_tuning"]["start"]
    assert set(parallel) == set(single)
    differ = [k for k in single if not torch.equal(parallel[k], single[k])]
    assert not differ, differ


def test_frozen_blocks_stay_bit_identical_under_fsdp2_x_tp_while_the_rest_trains(four):
    start, after = four[0]["fine_tuning"]["start"], four[0]["fine_tuning"]["after"]
    frozen = [k for k in start if part_of(k) == "blocks"]
    assert frozen and all(torch.equal(after[k], start[k]) for k in frozen)
    assert not torch.equal(after["head.out.weight"], start["head.out.weight"])


def test_the_mae_training_step_that_consumes_its_prediction_has_the_kept_steps_gradients(four):
    """keep_output=False (train_step: the loss's gradient overwrites the prediction) against keep_output=True
    (what run_parity compares with one device) at tp 4: bit-identical loss and gradients; other mask
    noise changes them (the comparison can fail)."""
    for rank in four:
        for name, r in rank["consume"].items():
            assert r["loss_equal"] and r["grads_equal"] and r["grads"] > 10, (name, r)
            assert not r["other_noise_equal"], name


def test_wavelength_tokenizers_at_tp4_have_the_single_device_loss_outputs_and_gradients(four):
    """model.tokenizer wavelength / hypernetwork, MAE with named (SAR) channels mixed in and an unused
    named vocabulary row: dchag at tp 4 with dropout (fp32) or bf16, fused against the materializing
    reference, FSDP2 x TP, the replicated and naive modes. Shared weights are whole on every rank, their
    partial gradients summed over TP; the conditioned output generates each rank's channels only."""
    cases = {k: v for k, v in four[0]["parity"].items() if k.startswith("tokenizer/")}
    assert len(cases) == 6
    bad = {k: v for k, v in cases.items() if v[0] > (BF16_TOLERANCE if "bf16" in k else FP32_TOLERANCE)}
    assert not bad, bad


def test_wavelength_tokenizer_parity_catches_wrong_or_unsummed_shared_gradients(four):
    worst, _, _ = four[0]["parity"]["fault/tokenizer/grad-scale"]
    assert worst == pytest.approx(3.0, rel=0.05)  # (tp - 1)
    unsummed = four[0]["tokenizer_unsummed"]
    assert unsummed["worst"] > 0.1, unsummed  # a rank's own channels' share only


def test_wavelength_model_built_rank_by_rank_has_the_single_device_initial_weights(four):
    for rank_result in four:
        built = rank_result["tokenizer_built"]
        assert built["names"] and not built["differ"], built
