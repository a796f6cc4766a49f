"""`dchag.FrontEnd`, `dchag.parallelize_front_end` and the Hugging Face ViT adapter.

One 2-rank gloo launch (module-scoped fixture) puts the channel-parallel front end into a Hugging Face
ViTModel and compares it with the single-device one in float64: outputs, the backbone's gradients and
the front end's (put back into the single-device layout), with a counter-check that leaving out
`finish_gradients` is caught. The example under examples/hf_vit_front_end runs through torchrun in
tests/test_documented_commands.py (docs/use.md documents its command).
"""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

import pytest
import torch

try:  # the hf extra: `make setup` installs it, so this file runs in CI; without it, fail loudly, never skip
    import transformers
except ImportError as error:  # pragma: no cover
    raise ImportError('tests/test_front_end_api.py needs the hf extra: pip install -e ".[test,hf]"') from error

import front_end_api_workers as W

import dchag
from dchag.adapters.hf_vit import use_front_end
from dchag.config import ConfigError, LevelConfig
from dchag.model.channel_spec import ChannelSpec
from dchag.parallel.launch import spawn

ROOT = Path(__file__).parents[1]
TIGHT = 1e-10  # float64: only rounding differs between the layouts


@pytest.fixture(scope="module")
def two():
    return spawn(W.suite, 2)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(W.CASES))
def test_channel_parallel_front_end_in_a_hf_vit_equals_the_single_device_one(two, case):
    for rank, results in enumerate(two):
        r = results[case]
        assert r["output"] < TIGHT, (rank, r)
        assert r["backbone_grads"] < TIGHT, (rank, r)
        assert r["front_end_grads"] < TIGHT, (rank, r)
        assert r["weights"] == 0.0, (rank, r)
        assert r["whole_input_same"], (rank, r)
        assert r["rng_untouched"], (rank, r)  # ranks keep drawing the same random numbers afterwards
    channels = [c for results in two for c in results[case]["input_channels"]]
    assert channels == W.CASES[case][0]  # each channel on one rank, in order


@pytest.mark.slow
@pytest.mark.parametrize("case", list(W.CASES))
def test_skipping_finish_gradients_is_caught(two, case):
    """Counter-check: without the sum over the group, the shared parameters' gradients are partial."""
    for results in two:
        r = results[case]
        assert r["partial_params"], r  # the last level's query and its qk-norm-free params are partial
        assert r["front_end_grads_unfinished"] > 1e-3, r


@pytest.mark.slow
def test_a_mesh_without_a_tp_dimension_is_refused_naming_its_dimensions(two):
    for results in two:
        assert results["mesh_error"] == (
            "parallelize_front_end: the mesh has 2 dimensions ['dp_shard', 'cp'] and none is named 'tp'; "
            "pass a 1-D mesh or name the front end's dimension 'tp'"
        )


@pytest.mark.slow
def test_a_bad_band_mask_is_refused_by_every_rank_before_any_collective(two):
    """A mask over one rank's channels, longer than C, of integers or with nothing kept: both ranks raise
    the same check's one-line error (none gathers alone and hangs), and a good mask still runs after."""
    expected = {
        "longer than C": "the channel-parallel front end got channel_keep of shape [8]; it takes [7], one bool",
        "integers": "the channel-parallel front end got channel_keep of dtype torch.int64; it takes a bool mask [7]",
        "all False": "the channel-parallel front end got channel_keep with all 7 channels False; keep at least one",
        "set_channel_keep, integers": "set_channel_keep got channel_keep of dtype torch.int64",
    }
    for rank, results in enumerate(two):
        bad = results["subsets"]["bad_keep"]
        own = [5, 2][rank]  # 7 channels in groups [3, 2, 2]: rank 0 holds two groups
        assert bad["this rank's channels only"].startswith(
            f"the channel-parallel front end got channel_keep of shape [{own}]; it takes [7]"
        ), bad
        for name, message in expected.items():
            assert bad[name] and bad[name].startswith(message) and "\n" not in bad[name], (name, bad[name])


@pytest.mark.slow
def test_a_band_subset_through_the_hf_adapter_matches_the_single_device_front_end(two):
    for results in two:
        r = results["subsets"]
        assert r["keep_output"] < TIGHT and r["keep_grads"] < TIGHT, r
        assert r["keep_changes_output"] > 1e-3, r  # counter-check: the subset is applied at all


@pytest.mark.slow
def test_masked_image_modeling_takes_all_channels_under_the_parallel_front_end(two):
    for rank, results in enumerate(two):
        r = results["subsets"]
        assert r["mim_own_channels"] == (
            f"pixel_values has {[5, 2][rank]} channels; a masked-image-modeling ViT reconstructs and scores all 7: "
            "give every rank all 7 channels (the channel-parallel front end takes its own slice)"
        )
        assert r["mim_loss"] < TIGHT, r


@pytest.mark.slow
def test_placement_errors_of_parallelize_front_end_name_its_own_arguments(two):
    for results in two:
        p = results["subsets"]["placement"]
        assert p["groups"] == (
            "level 1 of the hierarchy has 1 groups, fewer than the mesh's tp size 2: every rank needs at least one "
            "group; build the FrontEnd with groups >= 2 (a preset) or a hierarchy whose level 1 has >= 2 groups"
        )
        assert p["flat"].endswith("run the dchag.FrontEnd whole on every rank instead (no parallelize_front_end)")
        assert p["heads"].startswith("the last aggregation level has 1 heads, not divisible by the mesh's tp size 2")
        assert not [m for m in p.values() if "parallel.mode" in m or "model.hierarchy" in m or "parallel.tp" in m]


# --- single process --------------------------------------------------------------------------------


def small(channels=7, **kwargs) -> dchag.FrontEnd:
    names = [f"b{400 + 10 * c}.0" for c in range(channels)]
    return dchag.FrontEnd(names, **{"img_size": (8, 12), "patch_size": 4, "embed_dim": 16, **kwargs})


def test_front_end_exposes_its_patch_grid_and_returns_one_token_per_patch():
    torch.manual_seed(0)
    front = small()
    assert (front.embed_dim, front.patch_size, front.grid_size, front.num_patches) == (16, 4, (2, 3), 6)
    assert [level.kind for level in front.hierarchy.levels] == ["linear", "cross_attention"]  # dchag-L default
    assert front.fused and front.hierarchy.levels[0].sizes == [2, 2, 2, 1]  # 4 groups, uneven
    out = front(torch.randn(2, 7, 8, 12))
    assert out.shape == (2, 6, 16)
    # no position embedding inside: the same patch content gives the same token at every position
    same = torch.randn(1, 7, 4, 4).repeat(1, 1, 2, 3)
    tokens = front(same)
    assert torch.allclose(tokens, tokens[:, :1].expand_as(tokens), atol=1e-6)


def test_channels_are_given_by_name_wavelength_or_spec():
    front = dchag.FrontEnd(
        ["t2m", 550, {"wavelength": 664.6, "bandwidth": 31}, ChannelSpec("vv")], img_size=8, patch_size=4, embed_dim=8
    )
    assert front.channels == ["t2m", "b550.0", "b664.6", "vv"]
    assert front.channel_specs[2] == ChannelSpec("b664.6", 664.6, 31.0)
    assert front(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8)


def test_a_hierarchy_is_given_by_preset_or_levels():
    levels = [LevelConfig("cross_attention", groups=3), LevelConfig("cross_attention", groups=1)]
    front = small(hierarchy=levels, heads=2)
    assert [level.groups for level in front.hierarchy.levels] == [3, 1]
    assert small(hierarchy="flat").hierarchy.levels[0].groups == 1


BAD_ARGUMENTS = [
    ({"img_size": 10}, "FrontEnd(img_size=[10, 10]) is not divisible by patch_size=4"),
    ({"channels": ["a", "b", "a"]}, "FrontEnd(channels[2]='a') repeats channels[0]"),
    ({"channels": []}, "FrontEnd(channels=[]) must be a non-empty list"),
    ({"groups": 9}, "FrontEnd(hierarchy).levels[0].groups=9 is larger than the 7 tokens"),
    ({"hierarchy": "dchag-X"}, "FrontEnd(hierarchy='dchag-X') is unknown"),
    ({"heads": 3}, "FrontEnd(heads=3) does not divide embed_dim=16"),
    ({"tokenizer": "pixels"}, "FrontEnd(tokenizer='pixels') is unknown"),
    ({"channels": [550, -1]}, "FrontEnd(channels[1]).wavelength=-1 must be a positive number of nanometres"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS, ids=[m.split(")")[0] for _, m in BAD_ARGUMENTS])
def test_bad_front_end_arguments_give_one_line_naming_the_value(kwargs, message):
    args = {"channels": [f"b{400 + 10 * c}.0" for c in range(7)], "img_size": 8, "patch_size": 4, "embed_dim": 16}
    with pytest.raises(ConfigError) as caught:
        dchag.FrontEnd(**{**args, **kwargs})
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "shape", [(2, 6, 8, 12), (2, 7, 8, 8), (7, 8, 12)], ids=["channels", "image size", "no batch dimension"]
)
def test_an_input_of_the_wrong_shape_is_refused_naming_its_shape(shape):
    with pytest.raises(ValueError) as caught:
        small()(torch.randn(*shape))
    assert str(caught.value) == (
        f"the front end got x of shape {list(shape)}; it takes [B, 7, 8, 12] (7 channels of 8 x 12 pixels)"
    )


def hf_vit(channels=7, hidden=16, image=(8, 12), patch=4):
    config = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=list(image),
        patch_size=patch,
        num_channels=channels,
    )
    return transformers.ViTModel(config, add_pooling_layer=False)


def test_hf_vit_keeps_its_class_token_and_position_embeddings_around_the_front_end():
    torch.manual_seed(0)
    front, vit = small(), hf_vit()
    assert use_front_end(vit, front) is vit
    x = torch.randn(2, 7, 8, 12)
    emb = vit.embeddings
    expected = torch.cat([emb.cls_token.expand(2, -1, -1), front(x)], dim=1) + emb.position_embeddings
    assert torch.equal(emb(x), expected)
    assert vit(pixel_values=x).last_hidden_state.shape == (2, 1 + 6, 16)
    (vit(pixel_values=x).last_hidden_state.sum()).backward()
    assert front.tokenizer.weight.grad is not None and vit.embeddings.position_embeddings.grad is not None


@pytest.mark.parametrize(
    "vit_args, message",
    [
        ({"hidden": 24}, "the front end's embed_dim=16 is not the ViT's hidden_size=24"),
        ({"image": (8, 8)}, "the front end's img_size=[8, 12], patch_size=4 is not the ViT's image_size=[8, 8]"),
    ],
)
def test_hf_adapter_refuses_a_front_end_of_another_width_or_grid(vit_args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        use_front_end(hf_vit(**vit_args), small())
    with pytest.raises(TypeError, match="Linear has no embeddings.patch_embeddings"):
        use_front_end(torch.nn.Linear(2, 2), small())


def test_the_hf_extra_leaves_the_torch_build_alone():
    """transformers needs torch only through its own `torch` extra: installing dchag[hf] never pulls a
    torch build (pip would otherwise replace the CPU wheel with a CUDA one of several GB)."""
    unconditional = [r for r in requires("transformers") if "extra ==" not in r]
    assert not [r for r in unconditional if r.split(";")[0].strip().lower().startswith("torch")], unconditional
    extra = re.search(r"^hf = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert extra and re.fullmatch(r'"transformers[^"]*"', extra[1].strip()), extra  # the extra is transformers alone
    assert '-e ".[test,hf]"' in (ROOT / "Makefile").read_text()  # `make test` runs this file, never skips it


def test_the_python_example_of_the_docs_runs_and_prints_the_documented_geometry(capsys):
    text = (ROOT / "docs/use.md").read_text()
    section = text[text.index("## The front end in front of your own backbone") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    scope: dict = {}
    exec(compile(code, "docs/use.md", "exec"), scope)
    assert capsys.readouterr().out.strip() == "64 4 (8, 8) 64"
    assert scope["tokens"].shape == (2, 64, 64) and scope["out"].shape == (2, 65, 64)


BAD_KEEPS = [
    (torch.ones(8, dtype=torch.bool), "the front end got channel_keep of shape [8]; it takes [7], one bool per"),
    (torch.ones(4, dtype=torch.bool), "the front end got channel_keep of shape [4]; it takes [7], one bool per"),
    (torch.ones(7, dtype=torch.long), "the front end got channel_keep of dtype torch.int64; it takes a bool mask [7]"),
    (torch.ones(7), "the front end got channel_keep of dtype torch.float32; it takes a bool mask [7]"),
    (torch.zeros(7, dtype=torch.bool), "the front end got channel_keep with all 7 channels False; keep at least one"),
    ([True] * 7, "the front end got channel_keep=[True, True, True, True, True, True, True]; it takes a bool tensor"),
]


@pytest.mark.parametrize(
    "keep, message", BAD_KEEPS, ids=["longer", "shorter", "integers", "floats", "all False", "a list"]
)
def test_a_bad_band_mask_is_refused_in_one_line_naming_it(keep, message):
    with pytest.raises(ValueError) as caught:
        small()(torch.randn(1, 7, 8, 12), keep)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_placement_errors_name_the_settings_of_whoever_asked():
    """The same placement problem in the config's words (dchag train) and in parallelize_front_end's."""
    from dchag.parallel.channel_parallel import CONFIG_NAMES, place_channels
    from dchag.use.parallel_front_end import API_NAMES

    def error(names, **kwargs) -> str:
        with pytest.raises(ConfigError) as caught:
            place_channels(small(**kwargs), 2, "dchag", names)
        return str(caught.value)

    assert error(CONFIG_NAMES, groups=1).endswith("fewer than parallel.tp=2: every rank needs at least one "
                                                  "group; set model.hierarchy.groups >= 2")  # fmt: skip
    assert error(API_NAMES, groups=1).endswith("fewer than the mesh's tp size 2: every rank needs at least one "
                                               "group; build the FrontEnd with groups >= 2 (a preset) or a hierarchy "
                                               "whose level 1 has >= 2 groups")  # fmt: skip
    assert error(CONFIG_NAMES, hierarchy="flat").endswith("use parallel.mode=replicated or naive")
    assert error(API_NAMES, hierarchy="flat").startswith("parallelize_front_end needs a hierarchy of at least two")
    assert error(CONFIG_NAMES, heads=1).endswith(
        "set model.hierarchy.heads (default model.num_heads) to a multiple of 2"
    )
    assert error(API_NAMES, heads=1).endswith("build the FrontEnd with heads= a multiple of 2 that divides embed_dim")


def test_hf_adapter_passes_a_band_subset_and_refuses_position_interpolation():
    from dchag.adapters.hf_vit import set_channel_keep

    torch.manual_seed(0)
    front, vit = small(), hf_vit()
    use_front_end(vit, front)
    x, keep = torch.randn(2, 7, 8, 12), torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    emb = vit.embeddings
    assert set_channel_keep(vit, keep) is vit
    with torch.no_grad():
        expected = torch.cat([emb.cls_token.expand(2, -1, -1), front(x, keep)], dim=1) + emb.position_embeddings
        assert torch.equal(emb(x), expected)
        set_channel_keep(vit, None)
        assert not torch.allclose(emb(x), expected)  # counter-check: the subset did change the tokens
    with pytest.raises(ValueError, match=r"^set_channel_keep got channel_keep with all 7 channels False"):
        set_channel_keep(vit, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(TypeError, match="ViTModel has no dchag front end; call use_front_end"):
        set_channel_keep(hf_vit(), keep)
    with pytest.raises(ValueError, match=r"^interpolate_pos_encoding=True: a dchag front end takes the ViT's image_s"):
        emb.patch_embeddings(x, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"^pixel_values of 16 x 24: a dchag front end takes the ViT's image_size 8 x"):
        vit(pixel_values=torch.randn(1, 7, 16, 24), interpolate_pos_encoding=True)
