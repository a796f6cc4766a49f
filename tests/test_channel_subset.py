"""Any band subset (`train.channel_subset`, evaluation on some channels): left-out channels influence
nothing, a group left with no channel stays finite, fused equals reference, the draw is a function of
(seed, step), and a trained model reads a subset of its channels by name. The 4-rank parity case lives in
tests/test_tp_training_settings.py (one launch for all distributed cases)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from conftest import randomize_, small_config
from dist_workers import SMALL_MODEL

from dchag.config import ConfigError
from dchag.configure import load_config
from dchag.model import build_model
from dchag.model.hierarchy import HierarchyLevel
from dchag.model.tokenizer import ChannelTokenizer
from dchag.tasks import compute_loss
from dchag.tasks.channel_subset import channel_keep_for_step, keep_of_names

# 10 channels in 3 groups [4, 3, 3]: channels 4, 5, 6 (the whole second group) and 9 left out
KEEP = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
KINDS = {
    kind: f"model.hierarchy.preset={preset}" for kind, preset in (("L", "dchag-L"), ("C", "dchag-C"), ("tree", "tree"))
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _model(kind: str, task: str, fused: bool, *extra: str, dtype=torch.float64):
    cfg = small_config(KINDS[kind], f"train.task={task}", f"model.fused_front_end={str(fused).lower()}", *extra)
    return cfg, randomize_(build_model(cfg), 3, 0.1).to(dtype)


def _run(model, x, keep, task):
    """(output, d output / d x) of one forward with `keep`."""
    x = x.clone().requires_grad_(True)
    if task == "forecast":
        pred = model(x, torch.tensor([6.0, 24.0], dtype=x.dtype), channel_keep=keep).pred
    else:
        noise = torch.rand(2, 32, generator=torch.Generator().manual_seed(1))
        pred = model(x, mask_noise=noise, channel_keep=keep).pred
    pred.square().sum().backward()
    return pred.detach(), x.grad


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materializing"])
@pytest.mark.parametrize("kind", ["L", "C", "tree"])
@pytest.mark.parametrize("task", ["forecast", "mae"])
def test_left_out_channels_influence_nothing_and_a_group_left_empty_stays_finite(task, kind, fused):
    """Changing the left-out channels' pixels (to other values, even NaN) changes no output bit, and they
    get no gradient; the second group loses all its channels and the outputs stay finite."""
    _, model = _model(kind, task, fused, "model.residual_forecast=true" if task == "forecast" else "model.depth=1")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 16, 32, generator=g, dtype=torch.float64)
    other = x.clone()
    other[:, ~KEEP] = torch.randn(2, int((~KEEP).sum()), 16, 32, generator=g, dtype=torch.float64) * 100
    other[0, 4, 0, 0] = float("nan")
    pred, grad = _run(model, x, KEEP, task)
    pred_other, grad_other = _run(model, other, KEEP, task)
    assert torch.isfinite(pred).all() and torch.isfinite(grad).all()
    assert torch.equal(pred, pred_other)
    assert torch.equal(grad, grad_other) and not grad[:, ~KEEP].any() and grad[:, KEEP].abs().sum() > 0
    full, _ = _run(model, x, None, task)
    assert _rel(pred, full) > 1e-5  # the subset does change what the model sees


@pytest.mark.parametrize("kind", ["L", "C"])
def test_keeping_every_channel_is_exactly_no_mask(kind):
    _, model = _model(kind, "forecast", True, dtype=torch.float32)
    x = torch.randn(2, 10, 16, 32, generator=torch.Generator().manual_seed(2))
    lead = torch.tensor([6.0, 24.0])
    assert torch.equal(model(x, lead).pred, model(x, lead, channel_keep=torch.ones(10, dtype=torch.bool)).pred)


def test_an_empty_group_is_left_out_of_the_next_level():
    """The tokens of a group with no channel kept are invalid for level 2: its aggregator's weights then
    change nothing (they would, if its stand-in output leaked into the next level)."""
    _, model = _model("C", "forecast", True)
    x = torch.randn(2, 10, 16, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lead = torch.tensor([6.0, 24.0], dtype=torch.float64)
    before = model(x, lead, channel_keep=KEEP).pred
    with torch.no_grad():
        for p in model.front_end.hierarchy.levels[0].aggregator.parameters():
            p[1].add_(1.0)  # group 1: channels 4, 5, 6, all left out
    assert torch.equal(model(x, lead, channel_keep=KEEP).pred, before)


def test_a_linear_level_rescales_its_kept_members_so_that_a_mean_stays_a_mean():
    """At its initial weights (the group mean) a linear level of kept members 0, 2 of [0, 1, 2, 3] gives
    their mean; a group with none kept gives its bias (here 0) and is marked invalid."""
    level = HierarchyLevel("linear", [4, 3], 1, 1, 1)
    tokens = torch.arange(7.0).reshape(1, 7, 1, 1)  # [B, M, L, D]
    valid = torch.tensor([1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    out = level(tokens, valid)
    assert out.flatten().tolist() == [1.0, 0.0]
    assert level.output_valid(valid).tolist() == [True, False]


def _both_paths(kind, sizes, tokens, keep, seed=0):
    """(outputs, gradients, input gradient) of the materializing and the fused first level, float64."""
    torch.manual_seed(seed)
    channels, dim, patch = sum(sizes), 16, 3
    tok = randomize_(ChannelTokenizer(channels + 2, dim, patch), seed).double()
    level = randomize_(HierarchyLevel(kind, sizes, tokens, dim, 4 if kind == "cross_attention" else 1), seed + 1)
    level = level.double()
    index = torch.randperm(channels + 2)[:channels]
    x = torch.randn(2, channels, 2 * patch, 3 * patch, dtype=torch.float64)
    x = torch.where(keep[None, :, None, None], x, 0.0).requires_grad_(True)  # as tokenize_and_aggregate gives it
    results = []
    for fused in (False, True):
        for p in [*tok.parameters(), *level.parameters(), x]:
            p.grad = None
        if fused:
            weight, shift = tok.channel_params(index)
            out = level.forward_fused(x, weight, shift, keep)
        else:
            out = level(tok(x, index), keep)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        (out * cotangent).sum().backward()
        grads = {n: p.grad.clone() for n, p in [*tok.named_parameters(), *level.named_parameters()]}
        results.append((out.detach(), grads, x.grad.clone()))
    return results


@pytest.mark.parametrize("kind", ["cross_attention", "linear"])
@pytest.mark.parametrize("sizes,tokens", [([4, 3, 3], 2), ([5, 5], 1)], ids=["uneven", "even"])
def test_fused_equals_reference_on_a_band_subset_in_float64(kind, sizes, tokens):
    """Group 1 loses every channel, group 0 all but one: outputs and every gradient agree to 1e-12."""
    keep = torch.ones(sum(sizes), dtype=torch.bool)
    keep[1 : sizes[0]] = False  # group 0 keeps its first channel only
    keep[sizes[0] : sizes[0] + sizes[1]] = False  # group 1 keeps none
    (ref, ref_grads, ref_x), (out, grads, x_grad) = _both_paths(kind, sizes, tokens, keep)
    assert torch.isfinite(out).all() and torch.isfinite(x_grad).all()
    assert _rel(out, ref) <= 1e-12 and _rel(x_grad, ref_x) <= 1e-12
    for name in ref_grads:
        assert (grads[name] - ref_grads[name]).abs().max() <= 1e-12 * ref_grads[name].abs().max().clamp(min=1), name


def test_the_subset_draw_is_a_function_of_seed_and_step_within_min_and_max():
    cfg = small_config("train.channel_subset.p=0.5", "train.channel_subset.min=2", "train.channel_subset.max=6")
    draws = [channel_keep_for_step(cfg, step, 10) for step in range(200)]
    again = [channel_keep_for_step(cfg, step, 10) for step in range(200)]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(draws, again))
    used = [d for d in draws if d is not None]
    assert 60 < len(used) < 140  # about half the steps (p = 0.5)
    assert {int(d.sum()) for d in used} == {2, 3, 4, 5, 6}
    assert len({tuple(d.tolist()) for d in used}) > 50  # different channels, not one fixed subset
    other = small_config("train.channel_subset.p=0.5", "train.channel_subset.min=2", "train.seed=1")
    assert any(
        (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
        for a, b in zip(draws, [channel_keep_for_step(other, s, 10) for s in range(200)])
    )
    assert channel_keep_for_step(small_config(), 0, 10) is None  # off by default


@pytest.mark.parametrize(
    "setting,message",
    [
        ("train.channel_subset.p=1.5", "train.channel_subset.p=1.5 must be in [0, 1]"),
        ("train.channel_subset.min=0", "train.channel_subset.min=0 must be >= 1"),
        ("train.channel_subset.max=0", "train.channel_subset.max=0 must be >= train.channel_subset.min=1"),
        ("train.channel_subset.mni=2", "unknown config key 'train.channel_subset.mni'"),
    ],
)
def test_bad_channel_subset_settings_are_refused_naming_the_key(setting, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        small_config(setting)


def test_a_subset_larger_than_the_channels_is_refused():
    with pytest.raises(ConfigError, match="train.channel_subset.min=11 is more than the 10 channels"):
        small_config("train.channel_subset.p=1", "train.channel_subset.min=11")


def test_channel_names_become_a_keep_mask_and_unknown_names_are_named():
    names = ["t2m", "u10", "v10"]
    assert keep_of_names(names, ["v10", "t2m"]).tolist() == [True, False, True]
    with pytest.raises(ConfigError, match=r"channels \['z_500'\] are not channels of this model"):
        keep_of_names(names, ["t2m", "z_500"])
    with pytest.raises(ConfigError, match="names \\['u10'\\] more than once"):
        keep_of_names(names, ["u10", "u10"])


def test_the_loss_with_a_subset_covers_every_channel():
    """MAE: the reconstruction of the left-out bands is scored too (spectral inpainting); removing the
    left-out bands from the target changes the loss."""
    cfg, model = _model("C", "mae", True, dtype=torch.float32)
    x = torch.randn(2, 10, 16, 32, generator=torch.Generator().manual_seed(5))
    noise = torch.rand(2, 32, generator=torch.Generator().manual_seed(6))
    loss, out = compute_loss(model, {"x": x, "channel_keep": KEEP}, cfg, mask_noise=noise)
    per_band = ((out.pred - x) ** 2).mean(dim=(0, 2, 3))  # mae_loss_on=all: the mean over every band
    assert float(loss.detach()) == pytest.approx(float(per_band.detach().mean()), rel=1e-5)


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory):
    """A 3-step MAE run on 6 synthetic bands trained with train.channel_subset (every step a subset),
    with the masks the loop handed to compute_loss recorded."""
    import dchag.train.loop as loop
    from dchag.train.loop import train

    cfg = load_config(
        None,
        [
            *SMALL_MODEL,
            "data.kind=synthetic-hyperspectral",
            "data.channels=6",
            "data.num_samples=16",
            "data.workers=0",
            "model.hierarchy.groups=2",
            "train.task=mae",
            "train.steps=3",
            "train.batch_size=2",
            "train.channel_subset.p=1",
            "train.channel_subset.min=2",
        ],
    )
    seen, real = [], loop.compute_loss

    def spy(model, batch, *args, **kwargs):
        seen.append(batch.get("channel_keep"))
        return real(model, batch, *args, **kwargs)

    run = tmp_path_factory.mktemp("subset") / "run"
    loop.compute_loss = spy
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            summary = train(cfg, run, progress=False)
    finally:
        loop.compute_loss = real
    return cfg, run, summary, seen


def test_training_draws_each_steps_subset_from_seed_and_step(subset_run):
    cfg, _, summary, seen = subset_run
    assert len(seen) == 3 and all(k is not None for k in seen)
    for step, keep in enumerate(seen):
        assert torch.equal(keep, channel_keep_for_step(cfg, step, 6)) and int(keep.sum()) >= 2
    assert summary["final_loss"] == summary["final_loss"]  # finite, not NaN


def test_a_loaded_model_reads_a_subset_of_its_channels_by_name_in_any_order(subset_run):
    import dchag
    from dchag.data.errors import DataError

    _, run, _, _ = subset_run
    m = dchag.load(run)
    names = m.channels
    cube = torch.rand(6, 16, 32, generator=torch.Generator().manual_seed(7)) + 0.1
    picked = [4, 1, 2]
    out = m.reconstruct(cube[picked], channels=[names[i] for i in picked], seed=3)
    assert out.cube.shape == (6, 16, 32) and torch.isfinite(out.cube).all()  # every band, the missing ones too
    ordered = m.reconstruct(cube[[1, 2, 4]], channels=[names[i] for i in (1, 2, 4)], seed=3)
    assert torch.equal(out.cube, ordered.cube)
    other = cube.clone()
    other[[0, 3, 5]] = 5.0  # what the left-out bands hold changes nothing
    keep = keep_of_names(names, [names[i] for i in picked])
    x = m.normalise(other[None], names)
    noise = torch.rand(1, m.model.num_patches, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = m.model(x, mask_noise=noise, channel_keep=keep).pred
    assert torch.allclose(m.denormalise(direct, names)[0], out.cube, rtol=1e-5, atol=1e-5)
    assert m.embed(cube[picked], channels=[names[i] for i in picked], pool="mean").shape == (32,)
    with pytest.raises(DataError, match=r"channels \['b9999'\] are not channels of this model"):
        m.reconstruct(cube[:2], channels=["b9999", names[0]])
    with pytest.raises(DataError, match="cube has 3 channels and channels= names 2"):
        m.reconstruct(cube[:3], channels=names[:2])


def test_dchag_eval_on_a_band_subset_scores_every_band_and_the_left_out_ones(subset_run, tmp_path):
    import json

    from dchag.cli import main

    _, run, _, _ = subset_run
    names = load_config(str(run / "config.yaml")).channels
    out = tmp_path / "eval.json"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = main(["eval", "--run", str(run), "--samples", "2", "--channels", *names[:3], "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["channels"] == names[:3]
    assert sorted(result["left_out_bands"]["band_rmse"]) == sorted(names[3:])
    assert len(result["band_rmse"]) == 6
    assert "a left-out band: its normalisation mean" in result["baseline"]  # like for like with the model


@pytest.mark.parametrize(
    "keep, message",
    [
        (torch.ones(9, dtype=torch.bool), "the front end got channel_keep of shape [9]; it takes [10], one bool per"),
        (KEEP.long(), "the front end got channel_keep of dtype torch.int64; it takes a bool mask [10]"),
    ],
    ids=["shorter", "integers"],
)
def test_the_model_refuses_a_band_mask_of_the_wrong_shape_or_dtype(keep, message):
    """Checked from the mask's shape and dtype alone (no host sync in a training step); the values (at
    least one kept) are the public API's check, and train.channel_subset draws at least one."""
    _, model = _model("L", "forecast", True, dtype=torch.float32)
    with pytest.raises(ValueError) as caught:
        model(torch.randn(2, 10, 16, 32), torch.tensor([6.0, 24.0]), channel_keep=keep)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
