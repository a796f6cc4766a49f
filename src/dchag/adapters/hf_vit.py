"""A D-CHAG front end in a Hugging Face `transformers` ViT (extra: `pip install "dchag[hf]"`).

`use_front_end(vit, front_end)` replaces `embeddings.patch_embeddings` of a `ViTModel` (or of the
`.vit` inside `ViTForImageClassification` / `ViTForMaskedImageModeling`) with the front end. The class
token, mask token and position embeddings stay the backbone's: ViTEmbeddings adds them to whatever the
patch embedding returns, [B, L, D] with L patches in row-major order, which is what a front end gives.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class FrontEndPatchEmbeddings(nn.Module):
    """Stands where ViTPatchEmbeddings stood: pixel_values [B, C, H, W] -> [B, L, D] through the front end.

    Keeps the attributes ViT code reads from a patch embedding (`image_size`, `patch_size`,
    `num_patches`, `num_channels`, `projection.weight`).
    """

    def __init__(self, front_end: nn.Module):
        super().__init__()
        self.front_end = front_end
        self.image_size = tuple(front_end.img_size)
        self.patch_size = (front_end.patch_size, front_end.patch_size)
        self.num_patches = front_end.num_patches
        self.num_channels = front_end.num_channels

    @property
    def projection(self) -> SimpleNamespace:
        """ViTModel.forward casts pixel_values to `embeddings.patch_embeddings.projection.weight.dtype`:
        a stand-in whose `weight` is one of the front end's floating parameters gives it their dtype."""
        weight = next(p for p in self.front_end.parameters() if p.is_floating_point())
        return SimpleNamespace(weight=weight)

    def forward(self, pixel_values: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.front_end(pixel_values)  # [B, L, D]


def vit_embeddings(model: nn.Module) -> nn.Module:
    """The ViTEmbeddings of a ViTModel, or of the `.vit` of a ViT task model."""
    for owner in (model, getattr(model, "vit", None)):
        embeddings = getattr(owner, "embeddings", None)
        if embeddings is not None and hasattr(embeddings, "patch_embeddings"):
            return embeddings
    raise TypeError(
        f"{type(model).__name__} has no embeddings.patch_embeddings (nor .vit.embeddings.patch_embeddings); "
        "use_front_end takes a transformers ViTModel or a ViT task model"
    )


def use_front_end(model: nn.Module, front_end: nn.Module) -> nn.Module:
    """Replace the ViT's patch embedding with `front_end` (a `dchag.FrontEnd` or the result of
    `dchag.parallelize_front_end`), in place; returns `model`. The front end's width and patch grid must
    be the backbone's (`hidden_size`, `image_size / patch_size`): one-line errors name both otherwise."""
    embeddings = vit_embeddings(model)
    old = embeddings.patch_embeddings
    hidden = model.config.hidden_size
    if front_end.embed_dim != hidden:
        raise ValueError(
            f"the front end's embed_dim={front_end.embed_dim} is not the ViT's hidden_size={hidden}; "
            f"build the FrontEnd with embed_dim={hidden}"
        )
    image_size, patch_size = tuple(old.image_size), tuple(old.patch_size)
    if tuple(front_end.img_size) != image_size or (front_end.patch_size,) * 2 != patch_size:
        raise ValueError(
            f"the front end's img_size={list(front_end.img_size)}, patch_size={front_end.patch_size} is not the "
            f"ViT's image_size={list(image_size)}, patch_size={list(patch_size)}; its position embeddings fit "
            f"{old.num_patches} patches: build the FrontEnd with those sizes"
        )
    embeddings.patch_embeddings = FrontEndPatchEmbeddings(front_end)
    model.config.num_channels = front_end.num_channels
    return model
