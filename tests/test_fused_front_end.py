"""The fused front end computes exactly what the materializing reference computes, outputs and gradients."""

import pytest
import torch
from conftest import randomize_, small_config

from dchag.compare import grad_errors
from dchag.model import build_model
from dchag.model.hierarchy import HierarchyLevel
from dchag.model.tokenizer import ChannelTokenizer

TOL = dict(rtol=1e-5, atol=1e-6)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def both_paths(kind, sizes, tokens, dim, heads, patch, seed=0):
    torch.manual_seed(seed)
    channels = sum(sizes)
    tok = randomize_(ChannelTokenizer(channels + 2, dim, patch), seed)
    level = randomize_(HierarchyLevel(kind, sizes, tokens, dim, heads), seed + 1)
    index = torch.randperm(channels + 2)[:channels]
    x = torch.randn(2, channels, 2 * patch, 3 * patch, requires_grad=True)
    results = []
    for fused in (False, True):
        for p in [*tok.parameters(), *level.parameters(), x]:
            p.grad = None
        if fused:
            weight, shift = tok.channel_params(index)
            out = level.forward_fused(x, weight, shift)
        else:
            out = level(tok(x, index))
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (out * cotangent).sum().backward()
        grads = {
            n: p.grad.clone() for n, p in [*tok.named_parameters(), *level.named_parameters()] if p.grad is not None
        }
        results.append((out.detach(), grads, x.grad.clone()))
    return results


@pytest.mark.parametrize(
    "kind,sizes,tokens,heads,patch",
    [
        ("cross_attention", [8], 1, 4, 4),  # flat
        ("cross_attention", [5, 5, 5, 5], 1, 8, 2),
        ("cross_attention", [4, 3, 3], 2, 2, 3),  # uneven groups, two tokens per group
        ("cross_attention", [33], 1, 1, 4),  # one head, many channels
        ("linear", [6, 6], 1, 1, 4),
        ("linear", [5, 4, 4], 2, 1, 3),
        ("linear", [40], 1, 1, 2),
    ],
)
def test_fused_equals_reference_outputs_and_gradients(kind, sizes, tokens, heads, patch):
    (ref_out, ref_grads, ref_x), (out, grads, xg) = both_paths(kind, sizes, tokens, 16, heads, patch)
    assert rel(out, ref_out) <= 1e-5
    assert rel(xg, ref_x) <= 1e-5
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("preset", ["flat", "dchag-L", "dchag-C", "tree"])
@pytest.mark.parametrize("task", ["forecast", "mae"])
def test_whole_model_is_the_same_with_the_fused_front_end_on_or_off(preset, task):
    """In float64 the two paths agree to ~1e-15, so they are the same function; in fp32 the outputs agree
    to 1e-5 (whole-model fp32 gradients carry reduction rounding; per-level fp32 gradients are checked above)."""
    cfg_ref = small_config(f"model.hierarchy.preset={preset}", f"train.task={task}", "model.fused_front_end=false")
    cfg_fused = small_config(f"model.hierarchy.preset={preset}", f"train.task={task}")
    g = torch.Generator().manual_seed(11)
    x, lead, noise = torch.randn(2, 10, 16, 32, generator=g), torch.tensor([6.0, 24.0]), torch.rand(2, 32, generator=g)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ref = randomize_(build_model(cfg_ref), 3, 0.1).to(dtype)
        fused = build_model(cfg_fused).to(dtype)
        fused.load_state_dict(ref.state_dict())
        assert fused.front_end.fused and not ref.front_end.fused
        outs = []
        for model in (ref, fused):
            out = model(x.to(dtype), lead, noise) if task == "forecast" else model(x.to(dtype), mask_noise=noise)
            out.pred.square().mean().backward()
            outs.append((out.pred.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        assert rel(outs[1][0], outs[0][0]) <= tol
        if dtype == torch.float64:
            errors = grad_errors(outs[1][1], outs[0][1])
            assert max(errors.values()) <= tol, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_fused_path_falls_back_with_a_visible_warning_under_key_norm():
    with pytest.warns(UserWarning, match="norm on keys"):
        model = build_model(small_config("model.hierarchy.qk_norm=true"))
    assert not model.front_end.fused


def test_no_fallback_warning_when_the_fused_path_applies(recwarn):
    assert build_model(small_config()).front_end.fused
    assert not [w for w in recwarn if "fused_front_end" in str(w.message)]


def test_fused_path_never_builds_channel_tokens():
    """No intermediate of the fused first level has the [B, C, L, D] size of the channel tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    b, c, d, patch = 2, 64, 128, 4  # tokens [B, C, L, D] would be 8x the input (D / p^2)
    for kind, heads in (("cross_attention", 4), ("linear", 1)):
        tok = ChannelTokenizer(c, d, patch)
        level = HierarchyLevel(kind, [c // 2, c // 2], 1, d, heads)
        x = torch.randn(b, c, 32, 32, requires_grad=True)
        with LargestTensor() as mode:
            weight, shift = tok.channel_params(torch.arange(c))
            level.forward_fused(x, weight, shift).sum().backward()
        token_numel = b * c * (32 // patch) ** 2 * d
        assert mode.largest <= token_numel / 4, (kind, mode.largest, token_numel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["flat", "dchag-L", "dchag-C"])
def test_fused_front_end_trains_under_autocast(preset, dtype):
    """The fused custom autograd function computes forward and backward in autocast's dtype (its backward
    runs outside autocast) and hands back gradients in the parameters' dtype, close to fp32's."""
    cfg = small_config(f"model.hierarchy.preset={preset}")
    model = randomize_(build_model(cfg), 3, scale=0.1)
    x = torch.randn(2, 10, 16, 32, generator=torch.Generator().manual_seed(4))
    lead = torch.tensor([6.0, 12.0])
    model(x, lead).pred.square().mean().backward()
    fp32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        low = model(x, lead).pred
    assert low.dtype == dtype
    scale = 2.0**12 if dtype == torch.float16 else 1.0  # fp16 needs loss scaling (GradScaler) against underflow
    (low.float().square().mean() * scale).backward()
    grads = {n: p.grad / scale for n, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads.values())
    tokenizer = "front_end.tokenizer.weight"
    assert rel(grads[tokenizer], fp32[tokenizer]) < 64 * torch.finfo(dtype).eps, rel(grads[tokenizer], fp32[tokenizer])
