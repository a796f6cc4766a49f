"""Runs inside the spawned gloo ranks of tests/test_front_end_api.py: the channel-parallel `dchag.FrontEnd`
in a Hugging Face ViT against the single-device one, in float64, for a few hierarchies and meshes."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import ViTConfig, ViTForMaskedImageModeling, ViTModel

import dchag
from dchag.adapters.hf_vit import set_channel_keep, use_front_end
from dchag.config import ConfigError

IMG, PATCH, WIDTH, BATCH = 16, 4, 32, 3
BANDS = [f"b{400 + 20 * c}.0" for c in range(8)]
CASES = {  # name: (channels, FrontEnd keyword arguments, mesh shape and dimension names)
    "dchag-L/uneven/fused": (BANDS[:7], {"hierarchy": "dchag-L", "groups": 3}, ((2,), ("tp",))),
    "dchag-C/even/fused": (BANDS, {"hierarchy": "dchag-C", "groups": 4}, ((2,), ("tp",))),
    "dchag-L/materializing/2-D mesh": (BANDS[:6], {"hierarchy": "dchag-L", "fused": False}, ((1, 2), ("dp", "tp"))),
    # bands and a channel without a wavelength: a shared projection, computed and learned embeddings
    "wavelength tokenizer/dchag-C/uneven": (
        [*BANDS[:4], "sar_vv"],
        {"hierarchy": "dchag-C", "groups": 3, "tokenizer": "wavelength"},
        ((2,), ("tp",)),
    ),
}


def vit(channels: int) -> ViTModel:
    config = ViTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * WIDTH,
        image_size=IMG,
        patch_size=PATCH,
        num_channels=channels,
    )
    return ViTModel(config, add_pooling_layer=False).double()


@torch.no_grad()
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest reference value."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def worst(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest difference over all tensors relative to the largest reference value over all tensors (one
    scale: a gradient that is zero in exact arithmetic, like an attention key bias's, is rounding alone)."""
    assert found.keys() == reference.keys(), sorted(set(found) ^ set(reference))
    scale = max(float(v.abs().max()) for v in reference.values())
    return max(float((found[k] - reference[k]).abs().max()) for k in reference) / scale


def one_case(names: list[str], kwargs: dict, mesh_shape) -> dict:
    torch.manual_seed(0)  # the same backbone weights and inputs on every rank, as a user builds them
    channels = len(names)
    front = dchag.FrontEnd(names, img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, **kwargs).double()
    reference = vit(channels)
    backbone = copy.deepcopy(reference)
    use_front_end(reference, front)
    shape, dim_names = mesh_shape
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=dim_names)
    rng = torch.get_rng_state()
    parallel = dchag.parallelize_front_end(front, mesh)
    rng_untouched = torch.equal(rng, torch.get_rng_state())  # else the ranks' later draws (x here) would differ
    use_front_end(backbone, parallel)

    x = torch.randn(BATCH, channels, IMG, IMG, dtype=torch.float64)
    weight = torch.randn(BATCH, parallel.num_patches + 1, WIDTH, dtype=torch.float64)  # a loss that sees every output
    ref_out = reference(pixel_values=x).last_hidden_state  # [B, 1 + L, D]
    (ref_out * weight).sum().backward()
    out = backbone(pixel_values=x[:, parallel.channel_slice]).last_hidden_state
    (out * weight).sum().backward()
    with torch.no_grad():  # all channels in: the module takes its own slice
        whole_input_same = torch.equal(backbone(pixel_values=x).last_hidden_state, out)

    front_ref = {k: p.grad for k, p in front.named_parameters()}
    unfinished = worst(parallel.full_grads(), front_ref)  # counter-check: the partial gradients as they are
    parallel.finish_gradients()
    ref_backbone = {k: p.grad for k, p in reference.named_parameters() if ".front_end." not in k}
    par_backbone = {k: p.grad for k, p in backbone.named_parameters() if ".front_end." not in k}
    return {
        "output": rel(out, ref_out),
        "backbone_grads": worst(par_backbone, ref_backbone),
        "front_end_grads": worst(parallel.full_grads(), front_ref),
        "front_end_grads_unfinished": unfinished,
        "weights": worst(parallel.full_state_dict(), {k: v.detach() for k, v in front.state_dict().items()}),
        "whole_input_same": whole_input_same,
        "rng_untouched": rng_untouched,
        "input_channels": parallel.input_channels,
        "partial_params": sorted(k for k, s in parallel.specs.items() if s.partial_grad),
    }


KEEP = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)  # over the 7 channels of "dchag-L/uneven/fused"
BAD_KEEPS = {  # name: a mask the channel-parallel front end must refuse, on every rank alike, before any collective
    "this rank's channels only": lambda parallel: KEEP[parallel.channel_slice],
    "longer than C": lambda parallel: torch.ones(8, dtype=torch.bool),
    "integers": lambda parallel: KEEP.long(),
    "all False": lambda parallel: torch.zeros(7, dtype=torch.bool),
}


def error_of(call) -> str | None:
    try:
        call()
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def band_subsets_and_masked_image_modeling() -> dict:
    """At tp = 2 on 7 channels (rank 0: 5, rank 1: 2): bad keep masks are refused alike by both ranks
    (then a good one still runs: no rank was left inside a collective); a band subset given through
    `set_channel_keep` matches the single-device front end, output and gradients; a ViTForMaskedImageModeling
    refuses the rank's channels alone and, given all, has the single-device loss."""
    names, kwargs, _ = CASES["dchag-L/uneven/fused"]
    torch.manual_seed(0)
    front = dchag.FrontEnd(names, img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, **kwargs).double()
    reference = vit(7)
    backbone = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    parallel = dchag.parallelize_front_end(front, mesh)
    x = torch.randn(BATCH, 7, IMG, IMG, dtype=torch.float64)
    out = {"bad_keep": {k: error_of(lambda: parallel(x, make(parallel))) for k, make in BAD_KEEPS.items()}}
    use_front_end(reference, front)
    use_front_end(backbone, parallel)
    set_channel_keep(reference, KEEP)
    set_channel_keep(backbone, KEEP)
    out["bad_keep"]["set_channel_keep, integers"] = error_of(lambda: set_channel_keep(backbone, KEEP.long()))
    weight = torch.randn(BATCH, parallel.num_patches + 1, WIDTH, dtype=torch.float64)  # not a sum of squares:
    ref_out = reference(pixel_values=x).last_hidden_state  # after the final layer norm its gradient is ~0
    (ref_out * weight).sum().backward()
    got = backbone(pixel_values=x[:, parallel.channel_slice]).last_hidden_state
    (got * weight).sum().backward()
    parallel.finish_gradients()
    out["keep_output"] = rel(got, ref_out)
    out["keep_grads"] = worst(parallel.full_grads(), {k: p.grad for k, p in front.named_parameters()})
    set_channel_keep(backbone, None)
    with torch.no_grad():  # counter-check: the mask does change the output
        out["keep_changes_output"] = rel(backbone(pixel_values=x).last_hidden_state, ref_out)

    config = ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4, intermediate_size=2 * WIDTH,
        image_size=IMG, patch_size=PATCH, encoder_stride=PATCH, num_channels=7,
    )  # fmt: skip
    mim_ref = ViTForMaskedImageModeling(config).double()
    mim = copy.deepcopy(mim_ref)
    use_front_end(mim_ref, front)
    use_front_end(mim, dchag.parallelize_front_end(front, mesh))
    masked = torch.rand(BATCH, (IMG // PATCH) ** 2) < 0.5
    out["mim_own_channels"] = error_of(lambda: mim(pixel_values=x[:, parallel.channel_slice], bool_masked_pos=masked))
    with torch.no_grad():
        out["mim_loss"] = rel(mim(pixel_values=x, bool_masked_pos=masked).loss, mim_ref(x, bool_masked_pos=masked).loss)

    def placement_error(**changes) -> str | None:
        options = {"hierarchy": "dchag-L", **changes}
        small = dchag.FrontEnd(names, img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, **options)
        try:
            dchag.parallelize_front_end(small, mesh)
        except ConfigError as error:
            return str(error)
        return None

    out["placement"] = {
        "groups": placement_error(groups=1),
        "flat": placement_error(hierarchy="flat"),
        "heads": placement_error(heads=1),
    }
    return out


def suite() -> dict:
    results = {name: one_case(*case) for name, case in CASES.items()}
    results["subsets"] = band_subsets_and_masked_image_modeling()
    try:  # a 2-D mesh without a "tp" dimension is refused with a one-line message
        dchag.parallelize_front_end(
            dchag.FrontEnd(["a", "b"], img_size=IMG, patch_size=PATCH, embed_dim=WIDTH),
            init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "cp")),
        )
        results["mesh_error"] = None
    except ValueError as error:
        results["mesh_error"] = str(error)
    results["rank"] = dist.get_rank()
    return results
