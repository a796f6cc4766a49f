"""A D-CHAG front end in a Hugging Face `transformers` ViT (extra: `pip install "dchag[hf]"`).

`use_front_end(vit, front_end)` replaces `embeddings.patch_embeddings` of a `ViTModel` (or of the
`.vit` inside `ViTForImageClassification` / `ViTForMaskedImageModeling`) with the front end. The class
token, mask token and position embeddings stay the backbone's: ViTEmbeddings adds them to whatever the
patch embedding returns, [B, L, D] with L patches in row-major order, which is what a front end gives.
`set_channel_keep(vit, mask)` gives the front end a band subset for the calls that follow.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from dchag.model.front_end import check_channel_keep


class FrontEndPatchEmbeddings(nn.Module):
    """Stands where ViTPatchEmbeddings stood: pixel_values [B, C, H, W] -> [B, L, D] through the front end.

    Keeps the attributes ViT code reads from a patch embedding (`image_size`, `patch_size`,
    `num_patches`, `num_channels`, `projection.weight`). `channel_keep` [C] (None: every channel) is
    passed to the front end on every call (`set_channel_keep`). `all_channels`: the model reads every
    channel of pixel_values besides the front end (a masked-image-modeling decoder scores them all), so
    a channel-parallel front end must be given all of them, not just its own.
    """

    def __init__(self, front_end: nn.Module, all_channels: bool = False):
        super().__init__()
        self.front_end = front_end
        self.image_size = tuple(front_end.img_size)
        self.patch_size = (front_end.patch_size, front_end.patch_size)
        self.num_patches = front_end.num_patches
        self.num_channels = front_end.num_channels
        self.all_channels = all_channels
        self.channel_keep: torch.Tensor | None = None

    @property
    def projection(self) -> SimpleNamespace:
        """ViTModel.forward casts pixel_values to `embeddings.patch_embeddings.projection.weight.dtype`:
        a stand-in whose `weight` is one of the front end's floating parameters gives it their dtype."""
        weight = next(p for p in self.front_end.parameters() if p.is_floating_point())
        return SimpleNamespace(weight=weight)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values [B, C, H, W] (C: all channels, or a channel-parallel front end's own) -> [B, L, D].
        Only the ViT's image_size: transformers >= 5 interpolates position embeddings in ViTEmbeddings
        and never passes `interpolate_pos_encoding` here; a caller that does pass True is refused."""
        height, width = self.image_size
        size = f"{pixel_values.shape[-2]} x {pixel_values.shape[-1]}"
        if interpolate_pos_encoding or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{'interpolate_pos_encoding=True' if interpolate_pos_encoding else 'pixel_values of ' + size}: "
                f"a dchag front end takes the ViT's image_size {height} x {width} only (no position-embedding "
                "interpolation); crop or resize the images to it"
            )
        if self.all_channels and pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; a masked-image-modeling ViT reconstructs and "
                f"scores all {self.num_channels}: give every rank all {self.num_channels} channels (the "
                "channel-parallel front end takes its own slice)"
            )
        return self.front_end(pixel_values, self.channel_keep)  # [B, L, D]


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
    # a masked-image-modeling head reconstructs config.num_channels channels and scores them against
    # pixel_values: all of them must come in, whatever part of them the front end tokenizes
    all_channels = type(model).__name__.endswith("ForMaskedImageModeling")
    embeddings.patch_embeddings = FrontEndPatchEmbeddings(front_end, all_channels)
    model.config.num_channels = front_end.num_channels
    return model


def set_channel_keep(model: nn.Module, channel_keep: torch.Tensor | None) -> nn.Module:
    """Give the front end of a ViT prepared by `use_front_end` a band subset, `channel_keep` [C] (bool
    over all the front end's channels, at least one True, the same on every rank; None: every channel),
    for every forward until changed. pixel_values still hold all C channels (or, for a channel-parallel
    front end, the rank's own); the left-out ones influence nothing. Returns `model`."""
    patches = vit_embeddings(model).patch_embeddings
    if not isinstance(patches, FrontEndPatchEmbeddings):
        raise TypeError(f"{type(model).__name__} has no dchag front end; call use_front_end(model, front_end) first")
    if channel_keep is not None:
        check_channel_keep(channel_keep, patches.num_channels, values=True, where="set_channel_keep")
    patches.channel_keep = channel_keep
    return model
