"""model.tokenizer wavelength / hypernetwork: one set of weights for any channels, the fused front end
equal to the reference for them, and per-name rows for channels without a wavelength."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, small_config

from dchag.compare import grad_errors
from dchag.config import ConfigError
from dchag.data.channels import band_names
from dchag.model import build_model
from dchag.model.channel_spec import ChannelSpec
from dchag.model.hierarchy import HierarchyLevel
from dchag.model.spectral_tokenizer import HypernetworkTokenizer, WavelengthTokenizer

S2 = ["b442.7", "b492.4", "b559.8", "b664.6", "b704.1", "b740.5", "b782.8", "b832.8", "b864.7", "b945.1"]
S2 += ["b1373.5", "b1613.7", "b2202.4"]  # 13 bands
L8 = ["b443.0", "b482.0", "b561.4", "b654.6", "b864.6", "b1608.9", "b2200.7", "b1373.4", "b10895.0", "b12005.0"]
L8 += ["b590.0"]  # 11 bands (the last one made up: nothing needs to be real here)
# a mixed vocabulary: spectral bands, and two channels without a wavelength (SAR), one of them unused
MIXED = [
    ChannelSpec("b443.0", 443.0),
    ChannelSpec("vv"),
    ChannelSpec("b560.0", 560.0, 35.0),
    ChannelSpec("b665.0", 665.0),
    ChannelSpec("vh"),
    ChannelSpec("b842.0", 842.0, 115.0),
    ChannelSpec("hh"),
    ChannelSpec("b1610.0", 1610.0),
    ChannelSpec("b2190.0", 2190.0),
    ChannelSpec("b705.0", 705.0),
    ChannelSpec("b740.0", 740.0),
    ChannelSpec("b783.0", 783.0),
]
TOKENIZERS = {"wavelength": WavelengthTokenizer, "hypernetwork": HypernetworkTokenizer}


def spectral_mae(channels: list[str], *overrides: str):
    return small_config(
        "model.tokenizer=wavelength",
        "train.task=mae",
        "data.kind=synthetic-hyperspectral",
        f"data.channels=[{', '.join(channels)}]",
        "model.hierarchy.preset=dchag-C",
        "model.hierarchy.groups=4",
        *overrides,
    )


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("tokenizer", ["wavelength", "hypernetwork"])
def test_one_state_dict_loads_into_models_for_13_11_and_500_channels(tokenizer):
    """No parameter's shape depends on the channels (cross-attention levels, same groups): the 13-band
    model's state dict loads strictly into models for 11 other bands and for 500 bands, which run; and a
    band both models read gets the same tokenizer and output weights in each."""
    s2 = randomize_(build_model(spectral_mae(S2, f"model.tokenizer={tokenizer}")), 1, 0.1)
    state = s2.state_dict()
    x = torch.randn(2, 1, 16, 32, generator=torch.Generator().manual_seed(0))
    for channels in (L8, band_names(500)):
        other = build_model(spectral_mae(channels, f"model.tokenizer={tokenizer}"))
        other.load_state_dict(state, strict=True)
        with torch.no_grad():
            out = other(x.expand(-1, len(channels), -1, -1).contiguous())
        assert out.pred.shape == (2, len(channels), 16, 32) and bool(out.pred.isfinite().all())
    both = build_model(spectral_mae(["b443.0", *S2[1:]], f"model.tokenizer={tokenizer}"))
    both.load_state_dict(state, strict=True)
    with torch.no_grad():
        w_a, s_a = s2.front_end.tokenizer.channel_params(None)
        w_b, s_b = both.front_end.tokenizer.channel_params(None)
        assert torch.equal(w_a[1:], w_b[1:]) and torch.equal(s_a[1:], s_b[1:])
        assert not torch.equal(s_a[0], s_b[0])  # 442.7 nm and 443.0 nm: close, not the same
        assert rel(s_b[0], s_a[0]) < 0.1
        out_a, out_b = s2.head.pred.channel_weights()[0], both.head.pred.channel_weights()[0]
        assert torch.equal(out_a[1:], out_b[1:])


def test_per_channel_model_keeps_its_parameters_and_initial_values():
    """The default tokenizer is the per-name one, with the same parameter names and seeded values."""
    cfg = small_config()
    assert cfg.model.tokenizer == "per_channel"
    model = build_model(cfg)
    names = {n for n in model.state_dict() if n.startswith(("front_end.tokenizer", "head"))}
    assert {n for n in names if n.startswith("front_end.tokenizer")} == {
        "front_end.tokenizer.weight",
        "front_end.tokenizer.bias",
        "front_end.tokenizer.channel_embed",
    }
    mae = build_model(small_config("train.task=mae"))
    assert isinstance(mae.head.pred, torch.nn.Linear)
    # the seeded initial values, pinned at the code the reviewer found bit-identical to before the
    # sensor-agnostic tokenizers: (float64 sum, sum of absolute values) over the whole state dict
    for built, (total, absolute) in ((model, (775.2619012380917, 3145.955904179354)), (mae, PINNED_MAE)):
        state = built.state_dict().values()
        assert sum(float(v.double().sum()) for v in state) == pytest.approx(total, rel=1e-9)
        assert sum(float(v.double().abs().sum()) for v in state) == pytest.approx(absolute, rel=1e-9)


PINNED_MAE = (1054.6013845606874, 3519.1137711593715)


def both_paths(tokenizer_cls, kind, sizes, tokens, heads, patch=2, dim=8):
    """Reference (tokens materialized) and fused outputs and gradients, float64, of one tokenizer + first
    level over a permuted subset of a mixed vocabulary."""
    torch.manual_seed(0)
    tok = randomize_(tokenizer_cls(MIXED, dim, patch), 1).double()
    level = randomize_(HierarchyLevel(kind, sizes, tokens, dim, heads), 2).double()
    channels = sum(sizes)
    index = torch.randperm(len(MIXED))[:channels]
    assert any(not MIXED[i].spectral for i in index) and any(MIXED[i].spectral for i in index)
    x = torch.randn(2, channels, 2 * patch, 3 * patch, dtype=torch.float64, requires_grad=True)
    results = []
    for fused in (False, True):
        for p in [*tok.parameters(), *level.parameters(), x]:
            p.grad = None
        out = level.forward_fused(x, *tok.channel_params(index)) if fused else level(tok(x, index))
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (out * cotangent).sum().backward()
        params = [*tok.named_parameters(), *level.named_parameters()]
        results.append((out.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}, x.grad.clone()))
    return results


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
@pytest.mark.parametrize(
    "kind,sizes,tokens,heads",
    [("cross_attention", [4, 3, 3], 2, 2), ("cross_attention", [5, 4], 1, 4), ("linear", [4, 3, 2], 2, 1)],
)
def test_fused_front_end_equals_the_reference_for_wavelength_tokenizers(tokenizer, kind, sizes, tokens, heads):
    """Uneven groups, named and spectral channels mixed, float64: outputs, input and every parameter
    gradient (shared projection, encoders, by-name rows) agree to rounding."""
    (ref, ref_grads, ref_x), (out, grads, gx) = both_paths(TOKENIZERS[tokenizer], kind, sizes, tokens, heads)
    assert rel(out, ref) <= 1e-12
    assert rel(gx, ref_x) <= 1e-12
    assert set(grads) == set(ref_grads)
    assert any(n.startswith("embed.") for n in grads)  # the wavelength encoder takes part
    for name in ref_grads:
        assert rel(grads[name], ref_grads[name]) <= 1e-12, name


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
@pytest.mark.parametrize("preset", ["dchag-L", "dchag-C"])
def test_whole_wavelength_model_is_the_same_with_the_fused_front_end_on_or_off(tokenizer, preset):
    """MAE, uneven groups (10 channels in 3 groups), float64: predictions and gradients of every weight."""
    over = [f"model.tokenizer={tokenizer}", f"model.hierarchy.preset={preset}", "model.hierarchy.groups=3"]
    cfg_ref = spectral_mae(S2[:10], *over, "model.fused_front_end=false")
    ref = randomize_(build_model(cfg_ref), 3, 0.1).double()
    fused = build_model(spectral_mae(S2[:10], *over)).double()
    fused.load_state_dict(ref.state_dict())
    assert fused.front_end.fused and not ref.front_end.fused
    g = torch.Generator().manual_seed(11)
    x, noise = torch.randn(2, 10, 16, 32, generator=g, dtype=torch.float64), torch.rand(2, 32, generator=g)
    outs = []
    for model in (ref, fused):
        pred = model(x, mask_noise=noise).pred
        pred.square().mean().backward()
        outs.append((pred.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert rel(outs[1][0], outs[0][0]) <= 1e-10
    errors = grad_errors(outs[1][1], outs[0][1])
    assert max(errors.values()) <= 1e-10, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
def test_channels_without_a_wavelength_take_their_own_learned_rows(tokenizer):
    """A named channel's shift (and, for the hypernetwork, weight) is its by-name row: changing row `vh`
    moves that channel only; spectral channels' values come from their encoding."""
    tok = TOKENIZERS[tokenizer](MIXED, 8, 2)
    randomize_(tok, 4)
    w0, s0 = (t.detach().clone() for t in tok.channel_params(None))
    row = tok.table.names.index("vh")
    with torch.no_grad():
        tok.channel_embed[row] += 1.0
        if tokenizer == "hypernetwork":
            tok.name_weight[row] += 1.0
    w1, s1 = tok.channel_params(None)
    changed = [i for i in range(len(MIXED)) if not torch.equal(s0[i], s1[i])]
    assert changed == [4]
    if tokenizer == "hypernetwork":
        assert [i for i in range(len(MIXED)) if not torch.equal(w0[i], w1[i])] == [4]
    else:
        assert w1.stride(0) == 0  # one shared weight, expanded, never copied


def test_a_mixed_model_runs_with_channel_specs_naming_sar_channels():
    cfg = mixed_mae("hypernetwork")
    model = build_model(cfg)
    assert model.front_end.tokenizer.table.names == ["vv", "vh"]
    assert model.front_end.tokenizer.channel_embed.shape == (2, 32)
    out = model(torch.randn(2, 6, 16, 32))
    out.pred.square().mean().backward()
    assert model.front_end.tokenizer.name_weight.grad.abs().sum() > 0


def mixed_mae(tokenizer: str):
    """A 6-channel MAE over four bands and two channels without a wavelength (vv, vh)."""
    return small_config(
        f"model.tokenizer={tokenizer}",
        "data.kind=synthetic-hyperspectral",
        "data.channels=6",
        "model.hierarchy.groups=2",
        "model.channel_specs=[400, {name: vv}, {wavelength: 500, bandwidth: 20}, 600, {name: vh}, 700]",
        "train.task=mae",
    )


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
def test_bf16_parameters_with_float32_buffers_run_the_wavelength_encoders(tokenizer):
    """FSDP2's bf16 parameters (parallel.bf16_params) cast parameters only: the float32 encodings buffer
    meets bf16 weights in the tokenizer and the conditioned MAE output. Done here on one device."""
    model = build_model(mixed_mae(tokenizer))
    for p in model.parameters():
        p.data = p.data.bfloat16()
    assert model.front_end.tokenizer.table.features.dtype == torch.float32
    out = model(torch.randn(2, 6, 16, 32).bfloat16())
    assert out.pred.dtype == torch.bfloat16
    out.pred.float().square().mean().backward()
    assert model.head.pred.generate.in_weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
def test_a_mixed_run_moves_to_spectral_only_channels(tokenizer):
    """No named channel among the new channels: the by-name tables are dropped, not loaded as [0, ...]
    tensors the new model lacks; the shared weights come along unchanged."""
    from dchag.train.other_channels import model_for_channels

    cfg = mixed_mae(tokenizer)
    model = randomize_(build_model(cfg), 5)
    new_cfg, moved = model_for_channels(cfg, model, ["b450.0", "b550.0", "b650.0"])
    state = moved.state_dict()
    assert not [k for k in state if "name_" in k or k.endswith("channel_embed")]
    assert torch.equal(state["head.pred.generate.in_weight"], model.state_dict()["head.pred.generate.in_weight"])
    assert new_cfg.channels == ["b450.0", "b550.0", "b650.0"]
    assert moved(torch.randn(2, 3, 16, 32)).pred.shape == (2, 3, 16, 32)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.channel_specs=[400, 500]", "model.channel_specs has 2 entries but the data has 3 channels"),
        ("model.channel_specs=[400, -5, 600]", "model.channel_specs[1].wavelength=-5"),
        ("model.channel_specs=[{name: vv}, {name: vv}, 600]", "names ['vv'] for more than one channel"),
        ("model.channel_specs=[400, {colour: red}, 600]", "model.channel_specs[1]={'colour': 'red'}"),
        ("model.tokenizer=wavelenght", "model.tokenizer='wavelenght' is unknown"),
    ],
)
def test_bad_channel_specs_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        small_config(
            "data.kind=synthetic-hyperspectral",
            "data.channels=3",
            "model.hierarchy.groups=1",
            "model.tokenizer=wavelength",
            override,
        )
    assert message in str(err.value)


# ---- reading other channels: dchag.load(...).for_channels, dchag eval --data-config, train.init_from ------


@pytest.fixture(scope="module")
def wavelength_run(tmp_path_factory):
    """A wavelength MAE trained 2 steps on 8 synthetic bands (400-900 nm), as a run folder."""
    from dchag.train.loop import train

    run = tmp_path_factory.mktemp("wavelength") / "run"
    cfg = spectral_mae(band_names(8), "model.hierarchy.groups=3", "train.steps=2", "data.workers=0")
    train(cfg, run, progress=False)
    return run


def test_a_loaded_wavelength_model_reconstructs_another_sensors_bands(wavelength_run):
    """for_channels: the same weights on 5 bands the run never saw; its reconstruction equals that of a
    model built for those bands holding the run's weights."""
    import dchag

    trained = dchag.load(wavelength_run)
    other = ["b443.0", "b482.0", "b561.4", "b654.6", "b864.6"]
    moved = trained.for_channels(other)
    assert moved.channels == other and moved.wavelengths_nm == [443.0, 482.0, 561.4, 654.6, 864.6]
    cube = torch.rand(5, 16, 32, generator=torch.Generator().manual_seed(0))
    result = moved.reconstruct(cube, seed=1)
    assert result.cube.shape == (5, 16, 32) and bool(torch.isfinite(result.cube).all())
    direct = build_model(spectral_mae(other, "model.hierarchy.groups=3"))
    direct.load_state_dict(trained.model.state_dict())
    x = moved.normalise(cube[None], other)
    noise = torch.rand(1, moved.model.num_patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = moved.denormalise(direct.eval()(x, mask_noise=noise).pred, other)[0]
    assert torch.allclose(result.cube, expected, rtol=1e-6, atol=1e-6)
    assert trained.channels == band_names(8)  # the original is left as it was


def test_reading_other_channels_is_refused_where_weights_depend_on_them(wavelength_run):
    from dchag.train.other_channels import config_for_channels, model_for_channels

    per_channel = small_config("train.task=mae")
    with pytest.raises(ConfigError, match="model.tokenizer=per_channel"):
        config_for_channels(per_channel, ["b500.0", "b600.0", "b700.0"])
    linear = spectral_mae(S2, "model.hierarchy.preset=dchag-L")
    with pytest.raises(ConfigError, match="linear hierarchy level"):
        model_for_channels(linear, build_model(linear), L8)
    with pytest.raises(ConfigError, match=r"channels \['vv'\] have no wavelength"):
        model_for_channels(spectral_mae(S2), build_model(spectral_mae(S2)), [*L8[:5], "vv"])


def test_dchag_eval_scores_a_wavelength_run_on_another_configs_bands(wavelength_run, tmp_path):
    """`dchag eval --data-config`: a run trained on 8 bands scored on 6 others (synthetic), in one line."""
    import json

    from dchag.cli import main

    other = tmp_path / "other.yaml"
    bands = "[b420.0, b515.0, b640.0, b700.0, b810.0, b880.0]"
    other.write_text(f"data:\n  kind: synthetic-hyperspectral\n  channels: {bands}\n")
    out = tmp_path / "eval.json"
    code = main(
        ["eval", "--run", str(wavelength_run), "--data-config", str(other), "--samples", "4", "--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["data_config"] == str(other) and len(result["band_rmse"]) == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in (result["psnr_db"], result["sam_deg"]))


def test_init_from_a_wavelength_model_loads_every_shared_weight_into_other_channels(tmp_path):
    """Fine-tuning a 13-band wavelength model on 11 other bands plus a SAR channel: every weight loads
    whole (none depends on the bands), except the new named channel's rows, which stay fresh."""
    import fine_tuning_workers as FW

    from dchag.train.init_from import init_from

    over = ["model.tokenizer=hypernetwork", "train.task=mae", "data.kind=synthetic-hyperspectral"]
    over += ["model.hierarchy.preset=dchag-C", "model.hierarchy.groups=4", *FW.W.SMALL_MODEL]
    source = FW.perturbed_export([*over, f"data.channels=[{', '.join(S2)}]"], tmp_path / "s2.safetensors")
    cfg = small_config(*over, f"data.channels=[{', '.join(L8)}, vv]", f"train.init_from={source}")
    model = build_model(cfg)
    report = init_from(cfg, model, None, source)
    by_name = ["front_end.tokenizer.channel_embed", "front_end.tokenizer.name_weight", "head.pred.name_weight"]
    assert not report.shape_mismatch and not report.partial and not report.unused
    assert sorted(report.new) == sorted([*by_name, "head.pred.name_bias"])  # the SAR channel's rows only
    assert report.new_channels == ["vv"] and not report.positional  # the bands get no fresh weights
    assert len(report.loaded) == len(model.state_dict()) - 4
    fresh = build_model(cfg).state_dict()
    assert torch.equal(model.state_dict()[by_name[0]], fresh[by_name[0]])


def test_init_from_reports_a_wavelength_models_linear_levels_as_loaded_by_position(tmp_path):
    """A linear level's weight [G, k, n_max] has a slot per channel of each group: read into other bands
    it binds to the wrong channels, so it is reported as positional (not loaded), with a warning; the
    same bands load it as usual."""
    import fine_tuning_workers as FW

    from dchag.train.init_from import init_from, report_init

    over = ["model.tokenizer=wavelength", "train.task=mae", "data.kind=synthetic-hyperspectral"]
    over += ["model.hierarchy.preset=dchag-L", "model.hierarchy.groups=4", *FW.W.SMALL_MODEL]
    source = FW.perturbed_export([*over, f"data.channels=[{', '.join(S2[:8])}]"], tmp_path / "s2.safetensors")
    cfg = small_config(*over, f"data.channels=[{', '.join(L8[:8])}]", f"train.init_from={source}")
    report = init_from(cfg, build_model(cfg), None, source)
    linear = sorted(n for n in build_model(cfg).state_dict() if n.endswith(".aggregator.weight") and ".levels.0." in n)
    assert linear and report.positional == linear and not set(linear) & set(report.loaded)
    assert report.new_channels == [] and not report.shape_mismatch
    report_init(report, None)
    same = small_config(*over, f"data.channels=[{', '.join(S2[:8])}]", f"train.init_from={source}")
    again = init_from(same, build_model(same), None, source)
    assert not again.positional and set(linear) <= set(again.loaded)
