"""Channel-sharded MAE outputs: under D-CHAG a TP rank never holds a tensor of all C channels at full
resolution in a training step, and the sharded decoder (TP blocks, the rank's output rows, the loss
summed over local channels and reduced as a scalar) matches the single-device model.

One 2-rank gloo launch holds every case.
"""

from __future__ import annotations

import importlib

import dist_workers as W
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dchag.checks.parity import reference_and_parallel, run_parity
from dchag.parallel.launch import spawn

TOL = 1e-5
B, C, H, W_IMG = 2, 16, 16, 32  # the step's batch, channels and image (W.SMALL_MODEL's img_size)
MAE = ["train.task=mae", "model.hierarchy.preset=dchag-L", "data.channels=16", "model.hierarchy.groups=2"]


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation creates (forward, backward and optimizer alike), and
    the operations that allocate new storage of at least `large` elements (views and in-place results
    of their inputs are not new)."""

    def __init__(self, large: int):
        super().__init__()
        self.numel, self.where, self.large, self.allocations = 0, "", large, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_leaves((args, kwargs))}
        for t in tree_leaves(out):
            if _storage(t) is None:
                continue
            if t.numel() > self.numel:
                self.numel, self.where = t.numel(), f"{func} {tuple(t.shape)}"
            if t.untyped_storage().nbytes() >= self.large * t.element_size() and _storage(t) not in inputs:
                self.allocations.append(f"{func} {tuple(t.shape)}")
        return out


def _storage(t) -> int | None:
    """The address of a real tensor's storage (None for anything else: a DTensor, the fake tensors of
    DTensor's sharding propagation, a functional collective's result not yet waited for)."""
    if not isinstance(t, torch.Tensor) or isinstance(t, (DTensor, FakeTensor)):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _largest_in_a_training_step(mode: str) -> dict:
    """This rank's largest tensor during one MAE training step (after a warm-up step, so that the
    optimizer state exists), and the channels of the batch it loads."""
    from dchag.data import batch_indices, build_source
    from dchag.parallel import ParallelDims, build_mesh
    from dchag.parallel.construct import build_parallel_model
    from dchag.tasks import mask_noise_for_step
    from dchag.train.loop import Layout, loss_and_gradients, train_step
    from dchag.train.optim import build_optimizer

    cfg = W.config(*MAE, f"train.batch_size={B}", "parallel.tp=2", f"parallel.mode={mode}")
    plan = build_parallel_model(cfg, build_mesh(ParallelDims.from_config(cfg.parallel), "cpu"), torch.device("cpu"))
    layout, optimizer = Layout(plan.model, plan), build_optimizer(plan.model, cfg.train)
    source = build_source(cfg, channels=plan.input_channels)

    def batch(k: int) -> dict:  # made outside the measured step: the synthetic generator is not the model's
        loaded = source.batch(batch_indices(source.num_samples, B, k, 0))
        return {key: v for key, v in loaded.items() if key not in ("index", "worker")}

    def step(k: int, batch: dict) -> None:
        noise = mask_noise_for_step(cfg, k, B, plan.model.num_patches)
        train_step(layout, optimizer, batch, cfg, k, None, noise, source.channels)

    step(0, batch(0))
    second, third = batch(1), batch(2)
    with LargestTensor(large=B * (C // 2) * H * W_IMG) as whole_step:  # large: the size of a rank's prediction
        step(1, second)
    # forward, loss, backward (the failure guard's scan of the input, after backward, is not the loss's)
    with LargestTensor(large=B * (C // 2) * H * W_IMG) as loss_and_backward:
        loss_and_gradients(layout, optimizer, third, cfg, None, mask_noise_for_step(cfg, 2, B, plan.model.num_patches))
    return {
        "numel": whole_step.numel,
        "where": whole_step.where,
        "loaded_channels": second["x"].shape[1],
        "prediction_sized": loss_and_backward.allocations,
    }


def _decoder_sharding(cfg) -> dict:
    _, plan = reference_and_parallel(cfg)
    head = plan.model.head
    wq, fc2 = head.blocks[0].attn.wq.weight, head.blocks[0].mlp.fc2.weight
    return {
        "wq": (isinstance(wq, DTensor) and str(wq.placements), tuple(wq.to_local().shape), tuple(wq.shape)),
        "fc2": (isinstance(fc2, DTensor) and str(fc2.placements), tuple(fc2.to_local().shape), tuple(fc2.shape)),
        "pred_rows": (head.pred.out_features, head.channels),
    }


def _two_rank_suite() -> dict:
    parallelize_module = importlib.import_module("dchag.parallel.parallelize")  # the package exports the function
    out = {mode: _largest_in_a_training_step(mode) for mode in ("dchag", "replicated")}
    parity = {}
    for name, extra in {
        "all": [],
        "masked": ["train.mae_loss_on=masked"],
        "uneven": ["data.channels=11", "model.hierarchy.groups=3"],
        "checkpointing": ["parallel.activation_checkpointing=true"],
    }.items():
        cfg = W.config(*MAE, *extra, "parallel.tp=2")
        report = run_parity(cfg)
        parity[name] = (report.worst, report.output_rel, report.worst_grads(3))
    out["parity"] = parity
    out["sharding"] = _decoder_sharding(W.config(*MAE, "parallel.tp=2"))
    # counter-check: the decoder's input gradient left as this rank's partial sum (its channels' share)
    original = parallelize_module.copy_to_tp
    parallelize_module.copy_to_tp = lambda x, group: x
    try:
        out["fault"] = run_parity(W.config(*MAE, "parallel.tp=2")).worst
    finally:
        parallelize_module.copy_to_tp = original
    return out


@pytest.fixture(scope="module")
def two():
    return spawn(_two_rank_suite, 2)


def test_no_rank_holds_a_tensor_of_all_channels_at_full_resolution_in_a_dchag_training_step(two):
    for rank in two:
        r = rank["dchag"]
        assert r["loaded_channels"] == C // 2
        assert r["numel"] < B * C * H * W_IMG, r["where"]
        assert r["numel"] <= B * (C // 2) * H * W_IMG, r["where"]  # at most the rank's own channels


def test_the_mae_loss_allocates_nothing_the_size_of_the_prediction(two):
    """The decoder's output is the one prediction-sized allocation of forward, loss and backward: the loss
    builds its error by channel blocks and its gradient in the prediction's storage (no image-layout
    copy, no float copies, no separate gradient)."""
    for rank in two:
        assert len(rank["dchag"]["prediction_sized"]) == 1, rank["dchag"]["prediction_sized"]


def test_counter_check_the_replicated_baseline_does_hold_all_channels(two):
    for rank in two:
        r = rank["replicated"]
        assert r["loaded_channels"] == C
        assert r["numel"] >= B * C * H * W_IMG, r["where"]


def test_sharded_mae_decoder_matches_the_single_device_model(two):
    for rank in two:
        bad = {k: v for k, v in rank["parity"].items() if v[0] > TOL}
        assert not bad, bad


def test_mae_decoder_blocks_are_tensor_parallel_and_predict_only_the_ranks_channels(two):
    for rank in two:
        s = rank["sharding"]
        assert s["wq"] == ("(Shard(dim=0),)", (8, 16), (16, 16))  # decoder width 16, 2 heads over 2 ranks
        assert s["fc2"] == ("(Shard(dim=1),)", (16, 32), (16, 64))
        assert s["pred_rows"] == (8 * 16, 8)  # 8 channels x 4 x 4 pixels


def test_counter_check_an_unsummed_decoder_input_gradient_breaks_parity(two):
    for rank in two:
        assert rank["fault"] > 1e-3


# --- single process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, patch",
    [((2, 1, 4, 4), 1), ((2, 1, 8, 4), 4), ((2, 3, 8, 8), 2)],
    ids=["one channel, 1-pixel patches (a view)", "one channel, a grid one patch wide (a view)", "a copy"],
)
def test_the_mae_loss_of_an_image_leaves_the_callers_prediction_untouched(shape, patch):
    """With an image [B, C, H, W] for pred, the loss's backward writes its gradient into the patch-layout
    tensor only when that is a copy: where patchify gives a view of the caller's tensor, it is left alone."""
    from dchag.tasks.mae import mae_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(*shape, generator=g).requires_grad_(True)
    target = torch.randn(*shape, generator=g)
    mask = torch.ones(shape[0], (shape[2] // patch) * (shape[3] // patch))
    before = pred.detach().clone()
    mae_loss(pred, target, mask, patch).backward()
    assert torch.equal(pred.detach(), before)
    reference = pred.detach().clone().requires_grad_(True)
    ((reference - target) ** 2).mean().backward()
    assert torch.allclose(pred.grad, reference.grad, rtol=1e-6, atol=1e-7)


def test_counter_check_consuming_a_view_does_overwrite_the_callers_prediction():
    from dchag.tasks.patch_error import patch_sse, patchify

    pred = torch.randn(2, 1, 4, 4, requires_grad=True)
    before = pred.detach().clone()
    patch_sse(patchify(pred, 1), torch.zeros(2, 1, 4, 4), 1, consume=True).sum().backward()
    assert not torch.equal(pred.detach(), before)  # what mae_loss must not do with a view


@pytest.mark.parametrize("consume, allocations", [(True, 0), (False, 1)], ids=["consumed", "kept"])
def test_the_bf16_mae_loss_gradient_is_one_bf16_tensor_or_the_predictions_own_storage(consume, allocations):
    """Under bf16 the loss's backward makes its gradient in bf16 (no float32 buffer and bf16 copy of it),
    built channel block by channel block in float32 and rounded once: the same values as the float32
    gradient rounded to bf16."""
    from dchag.tasks.patch_error import patch_sse, patchify

    g = torch.Generator().manual_seed(0)
    b, c, p = 2, 32, 4
    patches = torch.randn(b, (H // p) * (W_IMG // p), c * p * p, generator=g).bfloat16().requires_grad_(True)
    target = torch.randn(b, c, H, W_IMG, generator=g)
    upstream = torch.rand(b, patches.shape[1], generator=g)
    expected = (2 * (patches.detach().float() - patchify(target, p)) * upstream[..., None]).bfloat16()
    with LargestTensor(large=patches.numel()) as loss_and_backward:
        sse = patch_sse(patches, target, p, consume=consume)
        # autograd.grad: a leaf's .grad would be a copy of a gradient that is the leaf's own storage
        (grad,) = torch.autograd.grad((sse * upstream).sum(), patches)
    assert sse.dtype == torch.float32
    assert len(loss_and_backward.allocations) == allocations, loss_and_backward.allocations
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, expected)


def test_a_float64_models_mae_loss_and_gradient_are_exact_in_float64():
    """The loss is computed in the prediction's dtype when that is wider than float32 (a float64 model),
    not rounded to float32."""
    from dchag.tasks.mae import mae_loss

    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 5, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(2, 5, 8, 8, generator=g, dtype=torch.float64)
    loss = mae_loss(pred, target, torch.ones(2, 16), 2)
    reference = pred.detach().clone().requires_grad_(True)
    exact = ((reference - target) ** 2).mean()
    exact.backward()
    loss.backward()
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach() - exact.detach())) <= 1e-13 * float(exact.detach())
    assert torch.allclose(pred.grad, reference.grad, rtol=1e-13, atol=0)
