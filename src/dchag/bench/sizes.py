"""The config lines every benchmark size shares (image, patch, width, heads, depth)."""

from __future__ import annotations


def model_overrides(size, depth: int) -> list[str]:
    """`key=value` overrides for a size with `img_size`, `patch`, `embed_dim` and `heads`."""
    return [
        f"model.img_size=[{size.img_size[0]}, {size.img_size[1]}]",
        f"model.patch_size={size.patch}",
        f"model.embed_dim={size.embed_dim}",
        f"model.num_heads={size.heads}",
        f"model.depth={depth}",
    ]
